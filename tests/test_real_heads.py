"""The real SmolLM2-135M trunk with heads trained here, on real WMT14 text (slow).

1. A short head-training run on News Commentary learns: its loss falls and its newstest2013
   agreement with the trunk rises above the untrained heads'.
2. Exactness: with those trained heads, with deliberately bad (random) heads and with an oracle
   that drafts the true greedy continuation, MTP decoding gives token-identical output to greedy
   decoding on the first 24 newstest2014 sentences at batch 8 (three batches; left padding,
   ragged prompt and output lengths) and the first 8 at batch 1 (to keep the suite's time), in
   float32; the oracle reaches τ near K, the random heads accept almost nothing. Also prompt
   lookup in front of the trained heads (drafting over a reduced vocabulary), on the first 8
   sentences at batch 8 (its batch-1 exactness is tested on a tiny trunk in
   tests/test_lookup.py). How much faster trained heads are is measured in docs/results.md.
3. Continuous batching: the 24 sentences through 8 refilled slots, lookup in front of the
   trained heads, give static greedy's tokens.
"""

import jax
import numpy as np
import pytest

from conftest import DATA, WMT

from gptk_jax.llama.checkpoint import load_converted
from gptk_jax.data.wmt import read_text_lines
from gptk_jax.decoding.draft_vocab import frequent_token_ids
from gptk_jax.decoding import Decoder, head_drafter
from gptk_jax.decoding.lookup import LookupDrafter
from gptk_jax.decoding.oracle import OracleDrafter, oracle_variables
from gptk_jax.data.prompts import prompt_format, translation_stop_ids
from gptk_jax.data.testsets import load_test_set, news_commentary
from gptk_jax.heads import HeadConfig
from gptk_jax.heads.io import load_heads
from gptk_jax.training import read_metrics, train_and_evaluate

pytestmark = pytest.mark.slow

K = 4
SENTENCES = 24
MAX_NEW = 12
B1_SENTENCES = 8    # at batch 1 every drafter (and greedy) runs on the first 8 sentences
STEPS = 20
BUCKET = 128   # every prompt (20-124 tokens) in one bucket: one compilation per drafter


@pytest.fixture(scope="module")
def training_run(tmp_path_factory, smollm2_dir):
    """Linear heads, K=4, trained for 20 steps on News Commentary against the trunk's argmax."""
    import importlib
    config = importlib.import_module("configs.linear_smollm2_wmt14").get_config()
    fields = {"trunk_checkpoint": str(smollm2_dir), "head.k": K, "head.offsets": (2, 3, 4),
              "data.train_prefixes": (str(news_commentary(DATA)),),
              # News Commentary's references, 0-shot (the SmolLM2 configs' distilled 2-shot
              # rows and line ranges are not this test's subject)
              "data.train_target_files": (), "data.train_line_ranges": (), "data.shots": 0,
              "data.bucket_lengths": (), "data.eval_target_file": "",
              "data.max_train_pairs": 80, "data.eval_max_sentences": 16, "data.max_len": 160,
              "training.global_batch_size": 8, "training.num_train_steps": STEPS,
              "training.log_every_steps": 3, "training.eval_every_steps": 0,
              "training.eval_at_start": True, "training.checkpoint_every_steps": 0,
              "optimizer.warmup_steps": 0, "optimizer.learning_rate": 2e-3,
              # the trunk runs once over the 80 rows, not in each of the 20 steps (packed
              # positions and the fused chunked loss run on the real trunk here)
              "features.cache": True}
    for key, value in fields.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    workdir = tmp_path_factory.mktemp("linear-run")
    result = train_and_evaluate(config, workdir, progress=False)
    assert result["status"] == "completed"
    return workdir


def test_short_run_on_the_real_trunk_learns(training_run):
    losses = [r["loss"] for r in read_metrics(training_run / "metrics.jsonl", "train")]
    evals = read_metrics(training_run / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [0, STEPS]
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 0.1, losses
    untrained, trained = evals
    for o in (2, 3, 4):
        assert trained[f"top1_trunk_o{o}"] > untrained[f"top1_trunk_o{o}"], (o, evals)
    assert trained["acceptance_trunk"] > untrained["acceptance_trunk"]


@pytest.fixture(scope="module")
def setting(smollm2_dir):
    model = load_converted(smollm2_dir)
    tok = model.tokenizer
    fmt = prompt_format("de", "en", shots=0, space_with_target=True)
    pairs = load_test_set("newstest2014", DATA, max_sentences=SENTENCES).pairs
    prompts = [tok.encode(fmt.prompt_text(p.src), bos=True) for p in pairs]
    assert len(prompts) == SENTENCES and len({len(p) for p in prompts}) > 10   # ragged
    params = jax.device_put(model.params)
    return model.config, params, prompts, translation_stop_ids(tok), tok.pad_id, tok


def _batches(prompts, batch):
    return [prompts[i:i + batch] for i in range(0, len(prompts), batch)]


@pytest.fixture(scope="module")
def decoder(setting):
    """Greedy; its `replace`s decode with the drafters (each compiles once per shape)."""
    config, params, _, stops, pad, _ = setting
    return Decoder(config, params, stop_ids=stops, pad_id=pad)


@pytest.fixture(scope="module")
def greedy(setting, decoder):
    prompts = setting[2]
    return {1: [decoder.generate(chunk, MAX_NEW, batch_size=1, bucket=BUCKET)
                for chunk in _batches(prompts[:B1_SENTENCES], 1)],
            8: [decoder.generate(chunk, MAX_NEW, batch_size=8, bucket=BUCKET)
                for chunk in _batches(prompts, 8)]}


def _drafters(setting, greedy_results, trained_dir, batch):
    """name -> per chunk (drafter, variables)."""
    config, params, prompts, stops, pad, _ = setting
    loaded = load_heads(trained_dir, config)
    trained = head_drafter(loaded.head_config, loaded.params, config, params)
    bad_config = HeadConfig("linear", k=K)
    rng = np.random.default_rng(0)
    bad_params = jax.tree.map(lambda x: rng.normal(0, 1.0, x.shape).astype(np.float32),
                              loaded.params)   # random D x D matrices: drafts are noise
    bad = head_drafter(bad_config, bad_params, config, params)
    # prompt lookup in front of the trained heads, which draft over a reduced vocabulary (the
    # 2,048 most frequent tokens of News Commentary English: the precomputed-rows path)
    english = read_text_lines(WMT / "train" / "news-commentary.first10k.en")[:2000]
    vocab = frequent_token_ids(setting[-1], english, 2048, prefix=" ", always=stops)
    cheap = head_drafter(loaded.head_config, loaded.params, config, params, draft_vocab=vocab)
    lookup = (LookupDrafter(K - 1, fallback=cheap[0]), LookupDrafter.variables(cheap[1]))
    out = {"trained": [trained] * len(greedy_results), "random": [bad] * len(greedy_results),
           "heads+lookup": [lookup] * len(greedy_results)}
    oracle = []
    for chunk, result in zip(_batches(prompts, batch), greedy_results):
        # The stop token a row ended on is not in `tokens`; any stop id drafted after the last
        # token is fine: verification stops the row there either way.
        # Padded to one length, so every chunk's variables have one shape (one compilation).
        conts = [(t + ([stops[0]] if r == "stop" else []) + [0] * (MAX_NEW + 1))[:MAX_NEW + 1]
                 for t, r in zip(result.tokens, result.stop_reasons)]
        oracle.append((OracleDrafter(K - 1, config.vocab_size),
                       oracle_variables(conts, [len(p) for p in chunk], batch, K - 1)))
    out["oracle"] = oracle
    return out


@pytest.mark.parametrize("batch", [1, 8])
def test_mtp_equals_greedy_with_trained_random_and_oracle_drafts(setting, decoder, greedy,
                                                                 training_run, batch):
    prompts = setting[2]
    greedy_results = greedy[batch]
    taus = {}
    for name, per_chunk in _drafters(setting, greedy_results, training_run / "heads",
                                     batch).items():
        accepted = emitted = steps = 0
        chunks = list(zip(_batches(prompts, batch), greedy_results, per_chunk))
        if name == "heads+lookup":   # its own compilations per prompt bucket: one batch of 8
            if batch == 1:           # sentences (tests/test_lookup.py: batch 1, tiny trunk)
                continue
            chunks = chunks[:1]
        mtp = decoder
        for chunk, reference, (drafter, variables) in chunks:
            # the same drafter with this chunk's variables: the executables are reused
            mtp = mtp.replace(drafter=drafter, drafter_vars=variables, tokens_per_step=K)
            got = mtp.generate(chunk, MAX_NEW, batch_size=batch, bucket=BUCKET)
            assert got.tokens == reference.tokens, (name, batch)
            assert got.stop_reasons == reference.stop_reasons, (name, batch)
            rows = got.stats
            steps += sum(len(r) for r in rows["emitted_per_row"])
            emitted += sum(sum(r) for r in rows["emitted_per_row"])
            accepted += sum(sum(r) for r in rows["accepted_per_row"])
        taus[name] = emitted / steps
    # τ = tokens per verify step (bonus token included); the last step of a row can be cut short
    # by a stop id or the token limit, so the oracle sits a little under K.
    assert taus["oracle"] > K - 0.6, taus
    assert taus["random"] < 1.1, taus
    assert taus["trained"] > 1.0, taus     # some drafts of the trained heads are accepted
    # the 0-shot outputs copy much of the source, which the lookup drafts
    if batch > 1:
        assert taus["heads+lookup"] > taus["trained"] + 0.3, taus


def test_continuous_batching_equals_greedy_on_the_real_trunk(setting, decoder, greedy,
                                                             training_run):
    """All 24 sentences through 8 continuously refilled slots (decoding/continuous.py), prompt
    lookup in front of the trained heads: static greedy's tokens (greedy through the same
    scheduler, K = 1, is tested on a tiny trunk in tests/test_continuous.py)."""
    config, params, prompts = setting[:3]
    loaded = load_heads(training_run / "heads", config)
    heads, head_vars = head_drafter(loaded.head_config, loaded.params, config, params)
    lookup = decoder.replace(drafter=LookupDrafter(K - 1, fallback=heads),
                             drafter_vars=LookupDrafter.variables(head_vars),
                             tokens_per_step=K)
    got = lookup.generate_continuous(prompts, MAX_NEW, batch_size=8, bucket=BUCKET)
    assert got.tokens == [t for r in greedy[8] for t in r.tokens]
    assert got.stop_reasons == [s for r in greedy[8] for s in r.stop_reasons]
    assert got.prefill_calls > 1     # slots were refilled
