"""One decoder factory (gptk_jax/decoding/factory.py): every drafter kind `make_decoder` builds
from a `DecoderSpec` gives greedy's tokens on the random tiny trunk, a bad spec is refused naming
its field, and generate, evaluate and distill build their decoders through it.

Tiny shapes: the random tiny trunk of configs/tiny.py (2 layers, width 32, byte tokenizer) and
randomly initialised heads of each family (k = 3) saved as heads folders.
"""

from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import DATA
from gptk_jax.decoding import DecodingError, factory
from gptk_jax.decoding.factory import GREEDY, DecoderSpec, Trunk, make_decoder
from gptk_jax.decoding.cost import VerifyCost
from gptk_jax.decoding.oracle import oracle_variables
from gptk_jax.heads import HeadConfig, init_head_params, make_head
from gptk_jax.heads.io import HeadsError, save_heads
from gptk_jax.llama.checkpoint import load_converted
from gptk_jax.training.inputs import ensure_tiny_trunk

MAX_NEW = 8
BUCKET = 16
KINDS = ("linear", "poma", "lstm", "eagle")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, {kind: heads folder}, prompt ids)."""
    root = tmp_path_factory.mktemp("factory")
    trunk_dir = ensure_tiny_trunk(root / "trunk")
    model = load_converted(trunk_dir)
    heads = {}
    for i, kind in enumerate(KINDS):
        config = HeadConfig(kind=kind, k=3)
        params = init_head_params(make_head(config, model.config), model.params,
                                  jax.random.PRNGKey(i + 1))
        heads[kind] = save_heads(root / f"heads-{kind}", config, params, model.config,
                                 trunk_dir.name)
    tok = model.tokenizer
    texts = ["Guten Morgen, guten Morgen", "Das Haus ist klein. Das Haus", "ja",
             "Wir danken Ihnen, wir danken"]
    prompts = [list(tok.encode(t, bos=True)) for t in texts]
    return model, heads, prompts


@pytest.fixture(scope="module")
def greedy(tiny):
    model, _, prompts = tiny
    decoder = make_decoder(model, GREEDY)
    return decoder, decoder.generate(prompts, MAX_NEW, bucket=BUCKET)


def _same(result, reference):
    assert result.tokens == reference.tokens
    assert result.stop_reasons == reference.stop_reasons


# (spec fields, heads family or None, W expected)
CASES = {
    "mtp-linear-draft-vocab": (dict(method="mtp", draft_vocab=tuple(range(0, 259, 2))),
                               "linear", 3),
    "mtp-poma-w2": (dict(method="mtp", tokens_per_step=2), "poma", 2),
    "mtp-lstm": (dict(method="mtp"), "lstm", 3),
    "lookup": (dict(method="lookup", lookup_max_ngram=2), None,
               factory.DEFAULT_LOOKUP_TOKENS_PER_STEP),
    "mtp+lookup-lstm": (dict(method="mtp+lookup", tokens_per_step=4), "lstm", 4),
    "mtp-eagle": (dict(method="mtp"), "eagle", 3),
    "tree-eagle": (dict(method="mtp+lookup-tree"), "eagle", 3),
    "tree-linear-w2": (dict(method="mtp+lookup-tree", tokens_per_step=2), "linear", 2),
    "tree-lstm-gated": (dict(method="mtp+lookup-tree", choose_width=True), "lstm", 3),
    # the lookup branch longer than the heads' chain: W is the lookup's
    "tree-linear-lookup-w5": (dict(method="mtp+lookup-tree", lookup_tokens_per_step=5),
                              "linear", 5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_drafter_gives_greedys_tokens(tiny, greedy, case):
    model, heads, prompts = tiny
    fields, kind, w = CASES[case]
    spec = DecoderSpec(**fields, heads=heads[kind] if kind else None)
    decoder = make_decoder(model, spec)
    assert decoder.tokens_per_step == w and decoder.drafter is not None
    if "lookup_tokens_per_step" in fields:             # lookup: W - 1 drafts, the heads: k - 1
        assert decoder.drafter.branch_drafts == (w - 1, 2)
    # choose_width: W per step, or for a tree a fixed W with batches gated by measured time
    assert decoder.gate_batches == spec.choose_width
    assert (decoder.width_policy is None) == (not spec.choose_width or case.startswith("tree"))
    result = decoder.generate(prompts, MAX_NEW, bucket=BUCKET)
    _same(result, greedy[1])
    assert sum(map(len, result.stats["accepted_per_row"])) > 0    # it did draft-and-verify


def test_oracle_and_greedy_from_a_base_decoder(tiny, greedy):
    model, _, prompts = tiny
    base, reference = greedy
    assert make_decoder(model, GREEDY, base=base) is base
    spec = DecoderSpec("oracle", tokens_per_step=3)
    conts = [t + ([s] if s is not None else []) for t, s in zip(reference.tokens,
                                                                reference.stop_tokens)]
    conts = [(c + [0] * MAX_NEW)[:MAX_NEW] for c in conts]
    references = oracle_variables(conts, [len(p) for p in prompts], len(prompts), 2)
    oracle = make_decoder(Trunk(model.config, model.params), spec, base=base,
                          references=references)
    assert oracle.params is base.params                    # the trunk went to the device once
    result = oracle.generate(prompts, MAX_NEW, bucket=BUCKET)
    _same(result, reference)
    assert all(a == 2 for row in result.stats["accepted_per_row"] for a in row[:-1])
    again = make_decoder(model, spec, base=oracle, references=references)
    assert again.executables is oracle.executables         # same loop: executables shared
    assert make_decoder(model, GREEDY, base=oracle).drafter is None


@pytest.mark.parametrize("fields, field", [
    (dict(method="beam"), "DecoderSpec.method"),
    (dict(method="greedy", tokens_per_step=3), "DecoderSpec.tokens_per_step"),
    (dict(method="lookup", tokens_per_step=1), "DecoderSpec.tokens_per_step"),
    (dict(method="lookup", tokens_per_step=True), "DecoderSpec.tokens_per_step"),
    (dict(method="oracle"), "DecoderSpec.tokens_per_step"),
    (dict(method="mtp"), "DecoderSpec.heads"),
    (dict(method="lookup", heads="somewhere"), "DecoderSpec.heads"),
    (dict(method="lookup", lookup_min_ngram=4), "lookup_min_ngram"),
    (dict(method="lookup", draft_vocab=(1, 2)), "DecoderSpec.draft_vocab"),
    (dict(method="mtp", heads="h", draft_vocab=()), "DecoderSpec.draft_vocab"),
    (dict(method="mtp", heads="h", lookup_tokens_per_step=5),
     "DecoderSpec.lookup_tokens_per_step"),
    (dict(method="mtp+lookup-tree", heads="h", lookup_tokens_per_step=1),
     "DecoderSpec.lookup_tokens_per_step"),
])
def test_a_bad_spec_is_refused_naming_its_field(fields, field):
    with pytest.raises(DecodingError, match=field):
        DecoderSpec(**fields)


def test_what_make_decoder_refuses(tiny):
    model, heads, _ = tiny
    with pytest.raises(HeadsError, match="W=4"):    # heads trained for W <= 3
        make_decoder(model, DecoderSpec("mtp", tokens_per_step=4, heads=heads["linear"]))
    with pytest.raises(DecodingError, match="references"):
        make_decoder(model, DecoderSpec("oracle", tokens_per_step=3))
    with pytest.raises(DecodingError, match="stop_ids"):
        make_decoder(Trunk(model.config, model.params), GREEDY)
    with pytest.raises(TypeError, match="DecoderSpec"):
        make_decoder(model, "greedy")


# --- every CLI builds through make_decoder ------------------------------------------------------

@pytest.fixture
def specs(monkeypatch) -> list:
    """The specs make_decoder is called with (it still builds the decoders)."""
    calls, real = [], factory.make_decoder

    def recording(model, spec, **runtime):
        calls.append(spec)
        return real(model, spec, **runtime)
    monkeypatch.setattr(factory, "make_decoder", recording)
    return calls


@pytest.mark.parametrize("flags, expected", [
    (["--decoding", "mtp", "--heads", "{lstm}", "--k", "2"],       # --k: the alias
     lambda heads: DecoderSpec("mtp", tokens_per_step=2, heads=heads["lstm"])),
    (["--decoding", "lookup", "--heads", "{poma}", "--tokens-per-step", "5",
      "--lookup-max-ngram", "2"],
     lambda heads: DecoderSpec("mtp+lookup", tokens_per_step=5, heads=heads["poma"],
                               lookup_max_ngram=2)),
])
def test_generate_builds_through_make_decoder(tiny, specs, flags, expected):
    from gptk_jax.generate import main
    model, heads, _ = tiny
    flags = [f.format(**{k: str(v) for k, v in heads.items()}) for f in flags]
    assert main(["--checkpoint", str(model.path), "--prompt", "Guten Tag", "--max-new-tokens",
                 "2", "--quiet", *flags]) == 0
    assert specs == [expected(heads)]


@pytest.mark.slow   # the evaluate pipeline end to end
def test_evaluate_builds_through_make_decoder(tiny, specs, tmp_path):
    from gptk_jax.evaluate import main
    model, heads, _ = tiny
    assert main(["--checkpoint", str(model.path), "--heads", str(heads["poma"]), "--split",
                 "newstest2014", "--data-root", str(DATA), "--max-sentences", "1",
                 "--batch-sizes", "1", "--max-new-tokens", "2", "--lookup", "--oracle",
                 "--lookup-tokens-per-step", "4", "--tree", "--no-progress",
                 "--output", str(tmp_path / "report")]) == 0
    folder = str(Path(heads["poma"]).absolute())
    import json
    command = json.loads((tmp_path / "report" / "report.json").read_text())["command"]
    assert command.startswith("python -m gptk_jax.evaluate --checkpoint ")   # as run
    assert command.endswith(f"--output {tmp_path / 'report'}")
    assert specs[0] == GREEDY
    assert set(specs) == {GREEDY, DecoderSpec("mtp", tokens_per_step=3, heads=folder),
                          DecoderSpec("lookup", tokens_per_step=4),
                          DecoderSpec("mtp+lookup", tokens_per_step=4, heads=folder),
                          DecoderSpec("mtp+lookup-tree", tokens_per_step=3, heads=folder,
                                      lookup_tokens_per_step=4),   # the lookup branch's W
                          DecoderSpec("oracle", tokens_per_step=3)}


def test_distill_builds_through_make_decoder(tiny, specs, tmp_path):
    from gptk_jax.distill import main
    model, _, _ = tiny
    (tmp_path / "src.de").write_text("Guten Morgen.\nJa.\n")
    out = tmp_path / "out.en"
    assert main(["--checkpoint", str(model.path), "--input", str(tmp_path / "src"),
                 "--output", str(out), "--max-new-tokens", "2", "--batch-size", "2",
                 "--tokens-per-step", "3", "--no-progress"]) == 0
    assert specs == [DecoderSpec("lookup", tokens_per_step=3)]
    assert len(out.read_text().splitlines()) == 2


def test_draft_vocab_is_kept_as_a_tuple():
    spec = DecoderSpec("mtp", heads=Path("x"), draft_vocab=np.array([3, 1]))
    assert spec.draft_vocab == (3, 1) and spec.heads == "x"
    assert hash(spec) == hash(DecoderSpec("mtp", heads="x", draft_vocab=[3, 1]))


# --- W chosen by measured cost, through the factory and evaluate --------------------------------

COSTS = {1: 1.0, 2: 1.5, 3: 2.0, 4: 2.5}     # W > 1 dearer than any random drafter earns


@pytest.mark.parametrize("fields, kind", [(dict(method="mtp"), "linear"),
                                          (dict(method="mtp+lookup", tokens_per_step=4), "lstm"),
                                          (dict(method="lookup"), None)])
def test_choose_width_gives_greedys_tokens(tiny, greedy, tmp_path, fields, kind):
    model, heads, prompts = tiny
    table = tmp_path / "cost.json"
    VerifyCost({b: COSTS for b in (1, 4)}, source="test").save(table)
    spec = DecoderSpec(**fields, heads=heads[kind] if kind else None, choose_width=True,
                       verify_cost=str(table))
    decoder = make_decoder(model, spec, base=greedy[0])
    result = decoder.generate(prompts, MAX_NEW, bucket=BUCKET)
    _same(result, greedy[1])
    assert result.stats["tokens_per_step_mode"] == "auto"
    histogram = result.stats["chosen_w_histogram"]
    assert sum(histogram[2:]) < sum(histogram)    # random drafters: W = 1 between probes


@pytest.mark.parametrize("fields, field", [
    (dict(method="greedy", choose_width=True), "choose_width"),
    (dict(method="lookup", verify_cost="t.json"), "verify_cost"),
    (dict(method="mtp+lookup-tree", heads="h", choose_width=True, verify_cost="t.json"),
     "verify_cost"),
])
def test_a_bad_width_spec_is_refused(fields, field):
    with pytest.raises(DecodingError, match=field):
        DecoderSpec(**fields)


@pytest.mark.slow   # the evaluate pipeline end to end
def test_evaluate_choose_width(tiny, specs, tmp_path):
    import json
    from gptk_jax.evaluate import main
    model, heads, _ = tiny
    table = tmp_path / "cost.json"
    VerifyCost(COSTS, source="test").save(table)
    out = tmp_path / "report"
    assert main(["--checkpoint", str(model.path), "--heads", str(heads["linear"]), "--split",
                 "newstest2014", "--data-root", str(DATA), "--max-sentences", "2",
                 "--batch-sizes", "1", "--max-new-tokens", "4", "--lookup", "--choose-width",
                 "--verify-cost", str(table), "--no-progress", "--output", str(out)]) == 0
    drafting = [s for s in specs if s.drafts]
    assert drafting and all(s.choose_width and s.verify_cost == str(table) for s in drafting)
    report = json.loads((out / "report.json").read_text())
    assert report["all_identical_to_greedy"]


def test_evaluation_keeps_one_drafting_loop_compiled_at_a_time(tiny, greedy):
    """evaluation/decode.py `Decoding`: running another method's loop releases the executables
    of the loop that ran before (one evaluation process compiling every method at every W and
    batch size ran out of code memory); that loop compiles again when it runs again, and every
    run still gives greedy's tokens."""
    from gptk_jax.evaluation.decode import Decoding, Method

    model, heads, prompts = tiny
    _, reference = greedy
    tok = model.tokenizer
    decoding = Decoding(model.config, model.params, MAX_NEW, tuple(tok.stop_ids), tok.pad_id,
                        BUCKET)
    lookup = Method("lookup", 3, DecoderSpec("lookup", tokens_per_step=3))
    lookup2 = Method("lookup2", 2, DecoderSpec("lookup", tokens_per_step=2))
    _same(decoding.batch(lookup, prompts, len(prompts)), reference)
    first = decoding.decoder(lookup)
    assert len(first.executables) > 0
    _same(decoding.batch(lookup2, prompts, len(prompts)), reference)
    assert len(first.executables) == 0 and len(decoding.decoder(lookup2).executables) > 0
    again = decoding.batch(lookup, prompts, len(prompts))
    _same(again, reference)
    assert again.compile_seconds > 0 and len(decoding.decoder(lookup2).executables) == 0


def test_heads_draft_over_their_own_draft_vocabulary_by_default(tiny, greedy, tmp_path):
    """Heads exported with a draft vocabulary (draft_vocab.json) draft over those ids wherever
    make_decoder builds them (generate, the demo, evaluate), unless the spec names others; the
    output is greedy's either way."""
    model, heads, prompts = tiny
    _, reference = greedy
    config = HeadConfig(kind="linear", k=3)
    params = init_head_params(make_head(config, model.config), model.params,
                              jax.random.PRNGKey(7))
    own = [1, 5, 9, 33, 64, 100, 120]
    folder = save_heads(tmp_path / "heads-vocab", config, params, model.config, "trunk",
                        draft_vocab={"ids": own})
    default = make_decoder(model, DecoderSpec("mtp", heads=str(folder)))
    assert np.asarray(default.drafter_vars["draft_vocab"]["ids"]).tolist() == own
    _same(default.generate(prompts, MAX_NEW, bucket=BUCKET), reference)
    named = make_decoder(model, DecoderSpec("mtp", heads=str(folder), draft_vocab=(2, 3, 4)))
    assert np.asarray(named.drafter_vars["draft_vocab"]["ids"]).tolist() == [2, 3, 4]
    plain = make_decoder(model, DecoderSpec("mtp", heads=str(heads["linear"])))
    assert "draft_vocab" not in plain.drafter_vars
