"""`evaluate --interleave` (evaluation/runs.py): the static runs go batch by batch (greedy's
batch, then a drafter's on the same prompts; each drafter in turn, paired with its own greedy
batches) and give the same run records as one method after another, only marked `interleaved`;
the oracle still runs after them; a greedy run that is already stored is reused and the drafters
then run one after another, as without the flag. With continuous batching each drafter's run is
bracketed by greedy's (G D1 G D2 G) and timed against their mean; stored continuous runs are
reused only behind a reused greedy run; --continuous-repeats N gives the mean and sd of N such
comparisons.
A stand-in Decoding returns fixed results, so only the orchestration is under test."""

import dataclasses
import json

import numpy as np
import pytest

from gptk_jax.decoding.factory import DecoderSpec
from gptk_jax.decoding.results import ContinuousResult, MTPResult
from gptk_jax.evaluation.decode import GREEDY, Method
from gptk_jax.evaluation.runs import static_runs
from gptk_jax.evaluation.store import RunStore

PROMPTS = [[5, i] for i in range(5)]          # 5 prompts, batches of 2: 3 batches
LOOKUP = Method("lookup", 3, DecoderSpec("lookup", tokens_per_step=3))


class FakeDecoding:
    """Each batch's result depends on the method and the prompts only (not on the order)."""

    def __init__(self):
        self.calls = []

    def batch(self, method, prompts, batch_size):
        self.calls.append((method.name, tuple(p[1] for p in prompts)))
        w = method.tokens_per_step
        tokens = [[p[1], p[1] + 1] for p in prompts]
        steps = [[1, 0] if w > 1 else [0, 0] for _ in prompts]
        return MTPResult(tokens=tokens, stop_reasons=["stop"] * len(prompts),
                         num_generated=[3] * len(prompts), num_steps=3,
                         prefill_seconds=0.5, decode_seconds=1.0 if w == 1 else 0.8,
                         compile_seconds=0.0, padded_shape=(batch_size, 2),
                         tokens_per_step=w,
                         stats={"accepted_per_row": steps,
                                "emitted_per_row": [[a + 1 for a in s] for s in steps],
                                "steps_per_row": [2] * len(prompts)},
                         stop_tokens=[9] * len(prompts))


def _oracle_free(runs):
    paired = ("interleaved", "greedy_tokens_per_second", "greedy_batch_seconds")
    return {k: {f: v for f, v in r.items() if f not in paired} for k, r in runs.items()}


def test_batches_alternate_and_the_runs_are_the_sequential_ones():
    seq, inter = FakeDecoding(), FakeDecoding()
    runs_seq, out_seq = static_runs(seq, [LOOKUP], PROMPTS, 2, None, False)
    runs_int, out_int = static_runs(inter, [LOOKUP], PROMPTS, 2, None, False, interleave=True)
    assert inter.calls == [("greedy", (0, 1)), ("lookup", (0, 1)), ("greedy", (2, 3)),
                           ("lookup", (2, 3)), ("greedy", (4,)), ("lookup", (4,))]
    assert seq.calls == [("greedy", (0, 1)), ("greedy", (2, 3)), ("greedy", (4,)),
                         ("lookup", (0, 1)), ("lookup", (2, 3)), ("lookup", (4,))]
    assert all(r["interleaved"] for r in runs_int.values())
    assert _oracle_free(runs_int) == runs_seq
    assert {k: o.tokens for k, o in out_int.items()} == {k: o.tokens for k, o in out_seq.items()}
    assert runs_int["lookup/b2"]["speedup"] == pytest.approx(1.5 / 1.3)


def test_the_oracle_runs_after_and_a_stored_greedy_run_is_reused(tmp_path):
    from gptk_jax.evaluation import runs as runs_module

    made = []
    real = runs_module.oracle_methods

    def oracle_methods(decoding, k, prompts, batch, greedy_tokens, known_stop_tokens):
        made.append(known_stop_tokens)
        return [Method("oracle", k, DecoderSpec("lookup", tokens_per_step=k))
                for _ in range(len(known_stop_tokens))]
    runs_module.oracle_methods = oracle_methods
    try:
        store = RunStore(tmp_path, {"settings": 1})
        first = FakeDecoding()
        runs, _ = static_runs(first, [LOOKUP], PROMPTS, 2, 3, False, store, interleave=True)
        assert [c[0] for c in first.calls] == ["greedy", "lookup"] * 3 + ["oracle"] * 3
        assert made == [[[9, 9], [9, 9], [9]]] and "oracle/b2" in runs
        again = FakeDecoding()
        store_again = RunStore(tmp_path, {"settings": 1})
        runs_again, _ = static_runs(again, [LOOKUP], PROMPTS, 2, 3, False, store_again,
                                    interleave=True)
        assert sorted(store_again.reused) == ["greedy/b2", "lookup/b2", "oracle/b2"]
        assert again.calls == [] and runs_again["greedy/b2"]["reused"]
    finally:
        runs_module.oracle_methods = real


class DriftingDecoding(FakeDecoding):
    """FakeDecoding on a machine that slows down: each call takes 10 % longer than the last."""

    def batch(self, method, prompts, batch_size):
        result = super().batch(method, prompts, batch_size)
        result.decode_seconds *= 1.1 ** len(self.calls)
        return result


def test_each_drafter_is_paired_with_its_own_greedy_batches():
    """Two drafters: each in turn interleaved with greedy (greedy's batches run once per
    drafter, one drafting loop compiled at a time), each speedup over its own pair's greedy:
    on a drifting machine the later drafter is not credited with the earlier greedy's speed."""
    other = Method("lookup2", 2, DecoderSpec("lookup", tokens_per_step=2))
    inter = DriftingDecoding()
    runs, _ = static_runs(inter, [LOOKUP, other], PROMPTS, 2, None, False, interleave=True)
    pairs = [("greedy", (0, 1)), ("{m}", (0, 1)), ("greedy", (2, 3)), ("{m}", (2, 3)),
             ("greedy", (4,)), ("{m}", (4,))]
    assert inter.calls == [(n.format(m=m), p) for m in ("lookup", "lookup2") for n, p in pairs]
    for name, first in (("lookup", 0), ("lookup2", 6)):
        greedy = sum(0.5 + 1.0 * 1.1 ** (first + 2 * i + 1) for i in range(3))
        drafted = sum(0.5 + 0.8 * 1.1 ** (first + 2 * i + 2) for i in range(3))
        run = runs[f"{name}/b2"]
        assert run["greedy_tokens_per_second"] == pytest.approx(15 / greedy)   # 5 rows x 3 tokens
        assert run["speedup"] == pytest.approx(greedy / drafted)
        assert sum(run["greedy_batch_seconds"]) == pytest.approx(greedy, abs=1e-3)


class ContinuousDecoding(DriftingDecoding):
    """DriftingDecoding that also decodes queues through refilled slots (one call per queue)."""

    def continuous(self, method, prompts, batch_size, on_finished=None):
        result = self.batch(method, prompts, batch_size)
        self.calls[-1] = ("continuous " + method.name, self.calls[-1][1])
        fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
        return ContinuousResult(**fields, loop_iterations=2, prefill_calls=1,
                                batch_size=batch_size)


def _continuous(decoding, methods, store=None, static_reused=False, interleave=True,
                repeats=1):
    from gptk_jax.evaluation.runs import continuous_runs
    static_greedy = {"tokens_per_second": 1.0, **({"reused": True} if static_reused else {})}
    greedy_tokens = [[p[1], p[1] + 1] for p in PROMPTS]
    return continuous_runs(decoding, methods, PROMPTS, 2, static_greedy, greedy_tokens, False,
                           store, interleave=interleave, repeats=repeats)


OTHER = Method("lookup2", 2, DecoderSpec("lookup", tokens_per_step=2))
ALL = (0, 1, 2, 3, 4)


def test_continuous_drafters_are_bracketed_by_greedy_runs():
    """--interleave --continuous: greedy's continuous run before and after each drafter's
    (G D1 G D2 G), each drafter's speedup over the mean of the two greedy runs around it (on a
    drifting machine: not over the first greedy run alone); the tokens and the counts are those
    of the runs without the flag."""
    seq, inter = ContinuousDecoding(), ContinuousDecoding()
    runs_seq, out_seq = _continuous(seq, [LOOKUP, OTHER], interleave=False)
    assert seq.calls == [("continuous greedy", ALL), ("continuous lookup", ALL),
                         ("continuous lookup2", ALL)]
    runs, out = _continuous(inter, [LOOKUP, OTHER])
    assert [c[0] for c in inter.calls] == ["continuous greedy", "continuous lookup",
                                           "continuous greedy", "continuous lookup2",
                                           "continuous greedy"]
    assert list(runs) == list(runs_seq) == ["greedy/b2/continuous", "lookup/b2/continuous",
                                            "lookup2/b2/continuous"]
    assert {k: o.tokens for k, o in out.items()} == {k: o.tokens for k, o in out_seq.items()}
    seconds = [0.5 + 1.0 * 1.1 ** i for i in (1, 3, 5)]            # the greedy calls' times
    for name, (i, drafted) in (("lookup", (0, 0.5 + 0.8 * 1.1 ** 2)),
                               ("lookup2", (1, 0.5 + 0.8 * 1.1 ** 4))):
        run, around = runs[f"{name}/b2/continuous"], seconds[i:i + 2]
        assert run["bracketed"] and run["identical_to_greedy"]
        assert run["greedy_bracket_seconds"] == pytest.approx(around, abs=1e-4)
        assert run["greedy_tokens_per_second"] == pytest.approx(15 / np.mean(around))
        assert run["speedup"] == pytest.approx(np.mean(around) / drafted)
        assert run["loop_iterations"] == 2 and run["prefill_calls"] == 1
        assert runs_seq[f"{name}/b2/continuous"]["speedup"] == pytest.approx(
            seconds[0] / (0.5 + 0.8 * 1.1 ** (i + 2)))               # against the first only
    assert runs["greedy/b2/continuous"]["seconds"] == pytest.approx(seconds[0])


def test_stored_continuous_runs_are_reused_only_behind_a_reused_greedy(tmp_path):
    """A stored greedy continuous run is reused only where the static greedy run was; then a
    stored drafter is reused and a missing one is bracketed by greedy runs of its own, the
    stored greedy record kept. Without a reused static greedy nothing is reused. Runs timed
    without --interleave are not reused under it."""
    settings = {"settings": 1}
    _continuous(ContinuousDecoding(), [LOOKUP], RunStore(tmp_path, settings))
    store = RunStore(tmp_path, settings)
    again = ContinuousDecoding()
    runs, _ = _continuous(again, [LOOKUP, OTHER], store, static_reused=True)
    assert store.reused == ["greedy/b2/continuous", "lookup/b2/continuous"]
    assert again.calls == [("continuous greedy", ALL), ("continuous lookup2", ALL),
                           ("continuous greedy", ALL)]
    assert runs["greedy/b2/continuous"]["reused"] and runs["lookup2/b2/continuous"]["bracketed"]
    store = RunStore(tmp_path, settings)
    fresh = ContinuousDecoding()
    _continuous(fresh, [LOOKUP, OTHER], store, static_reused=False)
    assert store.reused == [] and len(fresh.calls) == 5
    store = RunStore(tmp_path, settings)
    alone = ContinuousDecoding()
    _continuous(alone, [LOOKUP], store, static_reused=True, interleave=False)
    assert store.reused == [] and len(alone.calls) == 2


def test_repeated_continuous_runs_give_a_mean_and_a_spread(tmp_path):
    """--continuous-repeats 3: each drafter's run and greedy's after it three times (G D G D G D
    G, then the next drafter), the speedup the mean of the three bracketed ratios, with their
    sample sd; the tokens are those of one run. Runs stored without repeats are not reused."""
    settings = {"settings": 1}
    _continuous(ContinuousDecoding(), [LOOKUP], RunStore(tmp_path, settings), repeats=1)
    single = json.loads((tmp_path / "runs" / "lookup_b2_continuous.json").read_text())
    assert "continuous_repeats" not in repr(single)   # N = 1: the settings of before the flag
    store = RunStore(tmp_path, settings)
    deco = ContinuousDecoding()
    runs, out = _continuous(deco, [LOOKUP, OTHER], store, static_reused=True, repeats=3)
    assert store.reused == []
    names = [c[0].split()[1] for c in deco.calls]
    assert names == ["greedy"] + ["lookup", "greedy"] * 3 + ["lookup2", "greedy"] * 3
    greedy = [0.5 + 1.0 * 1.1 ** i for i in (1, 3, 5, 7, 9, 11, 13)]    # the greedy calls
    for name, first in (("lookup", 0), ("lookup2", 3)):
        drafted = [0.5 + 0.8 * 1.1 ** (2 * (first + j) + 2) for j in range(3)]
        ratios = [(greedy[first + j] + greedy[first + j + 1]) / 2 / drafted[j]
                  for j in range(3)]
        run = runs[f"{name}/b2/continuous"]
        assert run["repeats"] == 3 and run["bracketed"] and run["identical_to_greedy"]
        assert run["speedup_repeats"] == pytest.approx(ratios, abs=1e-4)
        assert run["speedup"] == pytest.approx(np.mean(ratios))
        assert run["speedup_sd"] == pytest.approx(np.std(ratios, ddof=1))
        assert run["seconds"] == pytest.approx(np.mean(drafted))
        assert run["greedy_bracket_seconds"] == pytest.approx(greedy[first:first + 4], abs=1e-4)
    assert out["lookup/b2/continuous"].tokens == [[p[1], p[1] + 1] for p in PROMPTS]
    stored = json.loads((tmp_path / "runs" / "lookup_b2_continuous.json").read_text())
    assert "'continuous_repeats': 3" in repr(stored)       # the repeats are in its settings
    again = RunStore(tmp_path, settings)
    _continuous(ContinuousDecoding(), [LOOKUP, OTHER], again, static_reused=True, repeats=3)
    assert again.reused == ["greedy/b2/continuous", "lookup/b2/continuous",
                            "lookup2/b2/continuous"]


def test_a_repeated_speedup_is_reported_with_its_spread():
    """report.md's row and docs/results.md's b8-continuous cell say mean ± sd (n runs)."""
    from gptk_jax.evaluation.report import _run_row
    from gptk_jax.evaluation.results_table import _continuous_speedup
    run = {"k": 4, "tokens_per_second": 80.0, "speedup": 0.987, "speedup_sd": 0.031,
           "repeats": 3, "tau": 1.8}
    row = _run_row("heads+lookup/b8/continuous", run, {"bleu": 1.0, "chrf": 2.0})
    assert "| 0.99 ± 0.03 (3 runs) |" in row
    assert "| 0.99 |" in _run_row("x", {**run, "repeats": 1}, {"bleu": 1.0, "chrf": 2.0})
    entry = {"runs": {"b8/continuous": run}, "speedup_b8_continuous": 0.987}
    assert _continuous_speedup(entry) == "0.99× ± 0.03 (3 runs)"


class ShortDrafterDecoding(ContinuousDecoding):
    """The drafter emits 2 tokens a row where greedy emits 3 (its output is not greedy's); with
    `drift_tokens`, its second call decodes other tokens than its first."""

    def __init__(self, drift_tokens=False):
        super().__init__()
        self.drafter_calls, self.drift_tokens = 0, drift_tokens

    def continuous(self, method, prompts, batch_size, on_finished=None):
        result = super().continuous(method, prompts, batch_size, on_finished)
        if method.name != "greedy":
            self.drafter_calls += 1
            result.num_generated = [2] * len(prompts)
            if self.drift_tokens and self.drafter_calls == 2:
                result.tokens = [[7, 7] for _ in prompts]
        return result


def test_repeated_ratios_count_each_sides_own_tokens():
    """A drafter whose output has fewer tokens than greedy's: each repeat's ratio is its tokens
    per second over greedy's (10 tokens against 15), as a single bracketed run's is."""
    runs, _ = _continuous(ShortDrafterDecoding(), [LOOKUP], repeats=2)
    greedy = [0.5 + 1.0 * 1.1 ** i for i in (1, 3, 5)]
    drafted = [0.5 + 0.8 * 1.1 ** i for i in (2, 4)]
    ratios = [10 / drafted[j] / (15 / ((greedy[j] + greedy[j + 1]) / 2)) for j in range(2)]
    run = runs["lookup/b2/continuous"]
    assert run["tokens"] == 10 and run["speedup_repeats"] == pytest.approx(ratios, abs=1e-4)
    assert run["tokens_per_second"] == pytest.approx(10 / np.mean(drafted))
    single, _ = _continuous(ShortDrafterDecoding(), [LOOKUP], repeats=1)
    assert single["lookup/b2/continuous"]["speedup"] == pytest.approx(
        10 / drafted[0] / (15 / ((greedy[0] + greedy[1]) / 2)))


def test_a_repeat_with_other_tokens_is_an_error_naming_the_flag():
    from gptk_jax.errors import GptkError
    with pytest.raises(GptkError, match="--continuous-repeats: lookup/b2/continuous"):
        _continuous(ShortDrafterDecoding(drift_tokens=True), [LOOKUP], repeats=2)
