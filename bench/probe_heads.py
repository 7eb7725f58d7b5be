"""Teacher-forced drafting accuracy along the trunk's own output: a quick probe of head recipes.

    python bench/probe_heads.py --distilled runs/distill/nc10k.2shot.smollm2.en --rows 1024 \
        --heldout 64 --steps 400 --families linear,lstm --targets hard,soft \
        [--heldout-distilled runs/distill/nt14.2shot.smollm2.en --heldout-sources PREFIX]

Builds the rows training builds (2-shot prompt + the trunk's own translation, SmolLM2's BOS
rule), runs the frozen trunk over them once (hidden states and the trunk's argmax at every
position), then trains each head family for `--steps` AdamW steps on batches of `--positions`
target positions and reports, on held-out rows, top-1 agreement with the trunk's argmax at
offsets 2..K (chain acceptance: a draft counts only if every earlier offset matched) and the
acceptance-estimated τ = 1 + Σ_k chain(k), counted by gptk_jax/training/draft_metrics.py (the
trainer's own validation, split 'eval_distilled', counts the same way). It also reports how often the trunk's argmax
at a target position equals the next token of the row (1.0: the re-tokenised distilled text is
exactly what the trunk decodes). One process, one trunk pass: a diagnosis, not a training run.
Writes JSON next to the table (--output).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptk_jax.data.prompts import PromptFormat, encode_examples, few_shot_from  # noqa: E402
from gptk_jax.data.wmt import Pair, read_parallel_text, read_text_lines  # noqa: E402
from gptk_jax.heads import HeadConfig, HeadFeatures, init_head_params, make_head  # noqa: E402
from gptk_jax.heads.common import trunk_params_for_heads  # noqa: E402
from gptk_jax.llama.checkpoint import load_converted  # noqa: E402
from gptk_jax.llama.model import Llama  # noqa: E402
from gptk_jax.training.draft_metrics import draft_sums, summarize_drafts  # noqa: E402
from gptk_jax.features.cache import trunk_fn  # noqa: E402

WMT = ROOT.parent / "shared/data/wmt14-de-en"


def build_rows(model, distilled: Path, sources_prefix: str, n: int, shots: int,
               shots_prefix: str = None):
    """Rows of (prompt + distilled target) for the first n pairs; the few-shot examples come
    from shots_prefix (default: sources_prefix), as the distillation's prompts did."""
    pool = read_parallel_text(shots_prefix or sources_prefix, "de", "en").pairs
    fmt_shots = few_shot_from(pool, shots) if shots else ()
    fmt = PromptFormat.for_languages("de", "en", shots=fmt_shots, space_with_target=True)
    sources = read_text_lines(f"{sources_prefix}.de")
    targets = read_text_lines(distilled)
    pairs = [Pair(s.strip(), t.strip()) for s, t in zip(sources, targets) if s.strip() and t.strip()]
    examples = encode_examples(fmt, model.tokenizer, pairs[:n])
    return [(np.array(e.prompt_ids + e.target_ids, np.int32), len(e.prompt_ids))
            for e in examples]


def trunk_features(model, rows, bucket: int = 64):
    """-> per row (hidden [T,D], hidden_normed [T,D], argmax [T]) as numpy float32/int32, from
    the feature cache's trunk pass (features/cache.py)."""
    run = trunk_fn(model.config, argmax_chunk=256)

    def forward(tokens, mask):
        pos = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
        out = run(model.params, tokens, pos, mask)
        return out["hidden"], out["hidden_normed"], out["trunk_argmax"]

    feats = []
    order = np.argsort([len(r) for r, _ in rows])
    by_index = {}
    batch = 8
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        width = -(-max(len(rows[j][0]) for j in idx) // bucket) * bucket
        tokens = np.zeros((batch, width), np.int32)
        mask = np.zeros((batch, width), bool)
        for b, j in enumerate(idx):
            tokens[b, :len(rows[j][0])] = rows[j][0]
            mask[b, :len(rows[j][0])] = True
        h, hn, am = jax.device_get(forward(tokens, mask))
        for b, j in enumerate(idx):
            t = len(rows[j][0])
            by_index[j] = (h[b, :t], hn[b, :t], am[b, :t])
    for j in range(len(rows)):
        feats.append(by_index[j])
    return feats


def position_table(rows, feats, k: int):
    """Every target-span position t (t+1 .. t+k-1 inside the row; the last prompt token
    included) -> arrays hidden, hidden_normed [N,D], next_tokens [N,W] (t+1..t+W: the row's
    tokens, the teacher-forcing inputs), targets [N,W] (the trunk's argmax at t..t+W-1, what
    verification compares offsets 1..W against), valid [N,W]."""
    out = {"hidden": [], "hidden_normed": [], "next": [], "targets": [], "valid": []}
    agree, total = 0, 0
    for (tokens, p), (h, hn, am) in zip(rows, feats):
        t_len = len(tokens)
        agree += int((am[p - 1:t_len - 1] == tokens[p:]).sum())
        total += t_len - p
        for t in range(p - 1, t_len - 1):
            nxt = np.zeros(k, np.int32)
            tgt = np.zeros(k, np.int32)
            val = np.zeros(k, bool)
            for j in range(k):
                if t + 1 + j < t_len:
                    nxt[j] = tokens[t + 1 + j]
                    tgt[j] = am[t + j]
                    val[j] = True
            out["hidden"].append(h[t])
            out["hidden_normed"].append(hn[t])
            out["next"].append(nxt)
            out["targets"].append(tgt)
            out["valid"].append(val)
    table = {key: np.stack(v) for key, v in out.items()}
    return table, agree / max(total, 1)


def features_of(table, index, k):
    n = len(index)
    ints = jnp.zeros((1, n), jnp.int32)
    return HeadFeatures(hidden=jnp.asarray(table["hidden"][index])[None],
                        hidden_normed=jnp.asarray(table["hidden_normed"][index])[None],
                        positions=ints, tokens=ints, token_mask=jnp.ones((1, n), bool),
                        next_tokens=jnp.asarray(table["next"][index])[None])


def train_and_score(family, recipe, targets_kind, model, train, held, args):
    k = args.tokens_per_step
    hc = HeadConfig(kind=family, k=k, recipe=recipe, lstm_layers=1, lstm_dropout=0.0)
    head = make_head(hc, model.config)
    tp = trunk_params_for_heads(model.params)
    params = init_head_params(head, tp, jax.random.PRNGKey(0))
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, args.lr * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
    opt_state = opt.init(params)
    offsets = hc.offsets                      # (2..k)
    weights = jnp.asarray([args.decay ** (o - 2) for o in offsets])

    def loss_fn(params, feats, tgt, val, teacher):
        logits = head.apply({"params": params}, tp, feats, method=head.train_logits)[0]  # [N,J,V]
        logp = jax.nn.log_softmax(logits, -1)
        cols = jnp.asarray(offsets) - 1
        if targets_kind == "soft":
            ce = -(teacher * logp).sum(-1)                                              # [N,J]
        else:
            ce = -jnp.take_along_axis(logp, tgt[:, cols][..., None], -1)[..., 0]
        m = val[:, cols].astype(jnp.float32)
        return ((ce * m).sum(0) / jnp.maximum(m.sum(0), 1) * weights).sum() / weights.sum()

    @jax.jit
    def step(params, opt_state, feats, tgt, val, teacher_hn):
        teacher = None
        if targets_kind == "soft":
            teacher = jax.nn.softmax(Llama(model.config).apply(
                {"params": model.params}, teacher_hn, method=Llama.unembed), -1)      # [N,J,V]
        loss, grads = jax.value_and_grad(loss_fn)(params, feats, tgt, val, teacher)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # teacher hidden_normed at t+o-1 for each offset o: the next row of the table within a row
    n = len(train["hidden"])
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    losses = []
    for s in range(args.steps):
        index = rng.choice(n, args.positions, replace=False)
        tgt, val = jnp.asarray(train["targets"][index]), jnp.asarray(train["valid"][index])
        hn_next = jnp.asarray(train["teacher_hn"][index][:, [o - 1 for o in offsets]]) \
            if targets_kind == "soft" else jnp.zeros((1,))
        params, opt_state, loss = step(params, opt_state, features_of(train, index, k), tgt,
                                       val, hn_next)
        if s % 50 == 0 or s == args.steps - 1:
            losses.append((s, float(loss)))
    seconds = time.perf_counter() - start

    scores = score(head, params, tp, held, k)
    return {"family": family, "recipe": recipe, "targets": targets_kind, **scores,
            "train_seconds": round(seconds, 1), "losses": losses}


def score(head, params, tp, held, k):
    """Top-1 and chain acceptance per offset on the held-out positions, and τ estimated."""
    offsets = head.head_config.offsets

    @jax.jit
    def predict(params, feats):
        logits = head.apply({"params": params}, tp, feats, method=head.train_logits)[0]
        return jnp.argmax(logits, -1)

    totals = None
    for i in range(0, len(held["hidden"]), 512):
        index = np.arange(i, min(i + 512, len(held["hidden"])))
        pred = np.asarray(predict(params, features_of(held, index, k)))      # [N,J]
        tgt = held["targets"][index][:, [o - 1 for o in offsets]]
        # the table's positions start at the last prompt token: the draft positions are those
        # where every offset has a target (the trainer's eval_distilled counts the same way)
        val = held["valid"][index][:, [o - 1 for o in offsets]].all(-1)
        sums = draft_sums(pred, tgt, val, offsets)
        totals = sums if totals is None else {key: totals[key] + sums[key] for key in sums}
    summary = summarize_drafts(totals, offsets)
    drafts = [o for o in offsets if o >= 2]
    return {"top1": [round(summary[f"accept_o{o}"], 4) for o in drafts],
            "chain": [round(summary[f"chain_o{o}"], 4) for o in drafts],
            "tau_est": round(float(summary["tau_est"]), 3),
            "positions_scored": int(summary["draft_positions"])}


def with_teacher(table, k):
    """teacher_hn[n, j] = hidden_normed at t+j (the position predicting t+j+1): the next rows
    of the table within the same row (valid where targets are)."""
    n = len(table["hidden"])
    hn = table["hidden_normed"]
    teacher = np.zeros((n, k) + hn.shape[1:], hn.dtype)
    for j in range(k):
        shifted = np.concatenate([hn[j:], np.zeros((j,) + hn.shape[1:], hn.dtype)])
        teacher[:, j] = shifted
    table["teacher_hn"] = teacher
    return table


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / ".cache/models/smollm2-135m"))
    p.add_argument("--distilled", required=True)
    p.add_argument("--sources", default=str(WMT / "train/news-commentary.first10k"))
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--heldout", type=int, default=64)
    p.add_argument("--tokens-per-step", "--k", dest="tokens_per_step", type=int, default=4,
                   help="W: the heads' k (offsets 2..W)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--decay", type=float, default=0.8)
    p.add_argument("--families", default="linear:default,lstm:conditioned")
    p.add_argument("--targets", default="hard,soft")
    p.add_argument("--heads", action="append", default=[],
                   help="also score these saved heads folders on the held-out rows")
    p.add_argument("--output", default=None)
    p.add_argument("--heldout-distilled", default=None,
                   help="held-out rows from this distilled file (e.g. the trunk's own newstest "
                        "translations) instead of the rows after --rows")
    p.add_argument("--heldout-sources", default=None,
                   help="PREFIX of --heldout-distilled's sources (PREFIX.de); shots stay --sources'")
    args = p.parse_args()

    model = load_converted(args.checkpoint)
    t0 = time.perf_counter()
    if args.heldout_distilled:   # held-out rows of another text, same prompt format
        rows = build_rows(model, Path(args.distilled), args.sources, args.rows, args.shots)
        rows += build_rows(model, Path(args.heldout_distilled), args.heldout_sources,
                           args.heldout, args.shots, shots_prefix=args.sources)
    else:
        rows = build_rows(model, Path(args.distilled), args.sources, args.rows + args.heldout,
                          args.shots)
    families = [f for f in args.families.split(",") if f]
    if not families:      # scoring saved heads only: the trunk runs over the held-out rows
        rows = [None] * args.rows + rows[args.rows:]
    feats = [None] * args.rows + trunk_features(model, rows[args.rows:]) if not families \
        else trunk_features(model, rows)
    print(f"trunk over {sum(r is not None for r in rows)} rows in "
          f"{time.perf_counter() - t0:.0f}s", file=sys.stderr)
    # training rows first (the first --rows pairs, as `train` reads them), held-out after
    held, agree_held = position_table(rows[args.rows:], feats[args.rows:], args.tokens_per_step)
    if families:
        train, agree = position_table(rows[:args.rows], feats[:args.rows], args.tokens_per_step)
        train = with_teacher(train, args.tokens_per_step)
        print(f"train positions {len(train['hidden'])}, held-out {len(held['hidden'])}; "
              f"trunk argmax == next row token: {agree:.3f} (train), {agree_held:.3f} "
              "(held-out)")
    results = []
    for folder in args.heads:
        from gptk_jax.heads.io import load_heads
        heads = load_heads(folder, model.config, model.path.name)
        head = make_head(heads.head_config, model.config)
        r = {"heads": folder, **score(head, heads.params, trunk_params_for_heads(model.params),
                                      held, args.tokens_per_step)}
        results.append(r)
        print(f"{folder}: top1 {r['top1']} chain {r['chain']} tau_est {r['tau_est']}",
              flush=True)
    for fam in families:
        family, recipe = fam.split(":")
        for kind in args.targets.split(","):
            r = train_and_score(family, recipe, kind, model, train, held, args)
            results.append(r)
            print(f"{family:7s} {recipe:11s} {kind:4s} top1 {r['top1']} chain {r['chain']} "
                  f"tau_est {r['tau_est']} ({r['train_seconds']}s) loss {r['losses'][0][1]:.2f}"
                  f" -> {r['losses'][-1][1]:.2f}", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "agree": agree_held,
                                                 "results": results}, indent=1))


if __name__ == "__main__":
    main()
