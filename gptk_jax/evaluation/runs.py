"""Decoding runs of one batch size, and their statistics.

`decode_batch_size` decodes every prompt with greedy, then with each drafting method and the
oracle, in consecutive static batches of B prompts; with `continuous`, and B > 1, greedy and each
drafter again through B continuously refilled slots. It returns run records (report.json's
`runs`) and `Output`s (tokens per prompt, per-row step records), both keyed
`<method>/b<B>` or `<method>/b<B>/continuous`. Decoding itself goes through `decode.Decoding`.

With `interleave`, the static runs go batch by batch instead: greedy's batch, then each
drafter's on the same prompts, then the next batch, so that a machine whose speed drifts over
minutes (other jobs, clocks) slows greedy and the drafters alike; their sums are the same runs.
The continuous runs are then bracketed: greedy's continuous run before and after each
drafter's (G D1 G D2 G, neighbours sharing one), and a drafter's speedup is over the mean time of
the two greedy runs around it, which cancels a drift that is linear over the three runs.
With `continuous_repeats` N > 1 each drafter's run and greedy's after it go N times (G D G D G
...), and its speedup is the mean of the N bracketed ratios, with their spread: one
continuous comparison moved by 4-9 % between runs minutes apart on this machine.

Each run is saved to the `store.RunStore` as soon as it finishes, and a run the store already
holds under the same settings is reused instead of decoded again. A run that is compared with
another (a drafter's speedup and exactness against greedy of its batch size and schedule) is
reused only when that greedy run was reused too, so the two always come from one process.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np

from tqdm import tqdm

from gptk_jax.decoding.acceptance import acceptance_stats
from gptk_jax.errors import GptkError
from gptk_jax.evaluation.decode import GREEDY, Decoding, Method, oracle_method
from gptk_jax.evaluation.store import RunStore


class RepeatMismatch(GptkError, RuntimeError):
    """A repeated continuous run decoded other tokens than its first run (--continuous-repeats)."""


@dataclasses.dataclass
class Output:
    tokens: list                    # generated ids per prompt (stop token excluded)
    records: Optional[list] = None  # per-row step records of draft-and-verify runs


def _chunks(prompts: list, batch: int) -> list:
    return [prompts[i:i + batch] for i in range(0, len(prompts), batch)]


def decode_chunks(decoding: Decoding, method: Union[Method, Sequence[Method]], prompts: list,
                  batch: int, progress: bool) -> list:
    """Consecutive static batches of `batch` prompts; `method` one for all, or one per batch."""
    chunks = _chunks(prompts, batch)
    methods = [method] * len(chunks) if isinstance(method, Method) else list(method)
    desc = f"{methods[0].name} b={batch}" if methods else ""
    return [decoding.batch(m, c, batch) for m, c in tqdm(list(zip(methods, chunks)), desc=desc,
                                                        disable=not progress, unit="batch",
                                                        leave=False)]


def decode_interleaved(decoding: Decoding, methods: Sequence[Method], prompts: list, batch: int,
                       progress: bool) -> tuple[list, list]:
    """Consecutive static batches, each decoded by greedy and then by every method in turn ->
    (greedy's results, per method its results), one per batch."""
    greedy, by_method = [], [[] for _ in methods]
    for chunk in tqdm(_chunks(prompts, batch), desc=f"interleaved b={batch}",
                      disable=not progress, unit="batch", leave=False):
        greedy.append(decoding.batch(GREEDY, chunk, batch))
        for results, method in zip(by_method, methods):
            results.append(decoding.batch(method, chunk, batch))
    return greedy, by_method


def _rounded(x, digits: int = 4):
    return None if x is None else round(float(x), digits)


def pooled(results: list) -> dict:
    """Totals of a list of GenerationResult / MTPResult / ContinuousResult."""
    tokens = sum(r.total_generated for r in results)
    seconds = sum(r.prefill_seconds + r.decode_seconds for r in results)
    return {"tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds > 0 else None,
            "compile_seconds": sum(r.compile_seconds for r in results),
            "trunk_calls": sum(r.num_steps for r in results),
            "prefill_seconds": sum(r.prefill_seconds for r in results),
            "prompt_tokens": sum(getattr(r, "prompt_tokens", 0) for r in results),
            "prefill_tokens": sum(getattr(r, "prefill_tokens", 0) for r in results),
            # each batch's prefill + decode seconds, in order (where a run's time went)
            "batch_seconds": [round(r.prefill_seconds + r.decode_seconds, 4) for r in results]}


def mtp_summary(results: list, k: int) -> dict:
    """Acceptance over every verify step of the results; with W chosen per step (auto), each
    step's W (an offset counts as reached only where it was drafted), the W histogram and the
    step costs the choice used."""
    accepted = [a for r in results for row in r.stats["accepted_per_row"] for a in row]
    emitted = [e for r in results for row in r.stats["emitted_per_row"] for e in row]
    per_step = all("widths_per_row" in r.stats for r in results) and results
    widths = [w for r in results for row in r.stats["widths_per_row"] for w in row] \
        if per_step else None
    stats = acceptance_stats(accepted, emitted, num_drafts=k - 1, widths=widths)
    if per_step and all("chosen_w_histogram" in r.stats for r in results):      # auto W
        chosen = np.sum([np.asarray(r.stats["chosen_w_histogram"]) for r in results], axis=0)
        stats.update(tokens_per_step_mode="auto", chosen_w_histogram=chosen.tolist(),
                     step_cost=results[-1].stats.get("step_cost"),
                     greedy_step_cost=results[-1].stats.get("greedy_step_cost"),
                     skipped_drafting=sum(r.stats.get("skipped_drafting", 0) for r in results))
    if any("drafter_rested" in r.stats for r in results):   # batches gated by measured time
        stats["rested_batches"] = sum(bool(r.stats.get("drafter_rested")) for r in results)
        stats["rate_gate_trace"] = [                         # per batch, after it ran
            [r.stats.get("drafter_rested"), r.stats.get("rate_gate_open"),
             _rounded(r.stats.get("measured_speed")), _rounded(r.stats.get("priced_speed"))]
            for r in results]
    return stats


def against_greedy(tokens: list, greedy_tokens: list) -> dict:
    return {"identical_to_greedy": tokens == greedy_tokens,
            "rows_differing_from_greedy": sum(a != b for a, b in zip(tokens, greedy_tokens))}


def oracle_methods(decoding: Decoding, k: int, prompts: list, batch: int, greedy_tokens: list,
                   known_stop_tokens: Optional[list]) -> list[Method]:
    """Per batch, an oracle drafting greedy's continuation plus the stop id the row ended on
    (from an earlier draft-and-verify run of the same batch; without one, an untimed oracle pass
    finds it), so every draft is accepted."""
    methods = []
    greedy_chunks = _chunks(greedy_tokens, batch)
    for i, chunk in enumerate(_chunks(prompts, batch)):
        stops = (known_stop_tokens[i] if known_stop_tokens else decoding.batch(
            oracle_method(decoding, k, chunk, [[0]] * len(chunk), batch), chunk,
            batch).stop_tokens)
        conts = [t + [s] if s is not None else t
                 for t, s in zip(greedy_chunks[i], stops)]
        methods.append(oracle_method(decoding, k, chunk, conts, batch))
    return methods


def _drafting_run(name: str, k: int, batch: int, results: list, greedy: dict,
                  greedy_tokens: list) -> tuple[dict, Output]:
    tokens = [t for r in results for t in r.tokens]
    stats = pooled(results)
    run = {"method": name, "batch_size": batch, "k": k, **stats,
           "speedup": stats["tokens_per_second"] / greedy["tokens_per_second"],
           **against_greedy(tokens, greedy_tokens), **mtp_summary(results, k)}
    return run, Output(tokens, [rec for r in results for rec in r.row_records()])


def _reuse(store: RunStore, key: str, k: int, allowed: bool = True):
    """(run, Output, stop tokens) the store holds for `key` under the same settings, or None."""
    found = store.load(key, k) if allowed else None
    if found is None:
        return None
    return found.run, Output(found.tokens, found.records), found.stop_tokens


def _keep(store: RunStore, key: str, k: int, run: dict, output: Output,
          stop_tokens: Optional[list] = None) -> tuple[dict, Output]:
    store.save(key, k, run, output.tokens, output.records, stop_tokens)
    return run, output


def _static_greedy(decoding: Decoding, prompts: list, batch: int, progress: bool,
                   store: RunStore, found) -> tuple[dict, Output, bool]:
    """greedy/b<batch>: (run, output, whether it was reused); found: the store's, or None."""
    key = f"greedy/b{batch}"
    if found is not None:
        return found[0], found[1], True
    results = decode_chunks(decoding, GREEDY, prompts, batch, progress)
    run = {"method": "greedy", "batch_size": batch, **pooled(results)}
    return (*_keep(store, key, 1, run, Output([t for r in results for t in r.tokens])), False)


def _interleaved_runs(decoding: Decoding, methods: Sequence[Method], prompts: list, batch: int,
                      progress: bool, store: RunStore) -> tuple[dict, dict, list]:
    """Each method in turn interleaved with greedy, batch by batch (greedy's batch, then the
    method's on the same prompts) -> (runs, outputs, stop tokens per batch of the last method),
    each run saved. A method's speedup is over its own paired greedy batches (the run records
    their `greedy_tokens_per_second` and `greedy_batch_seconds`); greedy/b<B> is the first
    pair's. One drafting loop is
    compiled at a time: several methods interleaved at once either recompiled each at every
    batch (a released loop; freshly compiled code ran a resting batch at 0.87x greedy's own) or
    held every loop's executables and ran out of code memory at batch 1 (LLVM "Cannot
    allocate memory"; session 16)."""
    runs, outputs, stops, key = {}, {}, [], f"greedy/b{batch}"
    for method in methods:
        greedy_results, (results,) = decode_interleaved(decoding, [method], prompts, batch,
                                                        progress)
        greedy = {"method": "greedy", "batch_size": batch, **pooled(greedy_results),
                  "interleaved": True}
        if key not in runs:
            runs[key], outputs[key] = _keep(store, key, 1, greedy, Output(
                [t for r in greedy_results for t in r.tokens]))
        name, w = f"{method.name}/b{batch}", method.tokens_per_step
        run, output = _drafting_run(method.name, w, batch, results, greedy, outputs[key].tokens)
        run.update(interleaved=True, greedy_tokens_per_second=greedy["tokens_per_second"],
                   greedy_batch_seconds=greedy["batch_seconds"])
        runs[name], outputs[name] = _keep(store, name, w, run, output,
                                          [s for r in results for s in r.stop_tokens])
        stops = [r.stop_tokens for r in results]
    return runs, outputs, stops


def static_runs(decoding: Decoding, methods: Sequence[Method], prompts: list, batch: int,
                oracle_k: Optional[int], progress: bool,
                store: Optional[RunStore] = None, interleave: bool = False
                ) -> tuple[dict, dict]:
    """Greedy, each drafting method (interleave: batch by batch, unless greedy's run is
    reused), then the oracle (W = oracle_k; None: no oracle)."""
    store = store or RunStore(None, {})
    found = _reuse(store, f"greedy/b{batch}", 1)     # looked up once: a hit is logged
    if interleave and methods and found is None:
        runs, outputs, known_stop_tokens = _interleaved_runs(decoding, methods, prompts, batch,
                                                             progress, store)
        _oracle_run(decoding, prompts, batch, oracle_k, progress, store, runs, outputs,
                    known_stop_tokens, greedy_reused=False)
        return runs, outputs
    greedy, greedy_output, greedy_reused = _static_greedy(decoding, prompts, batch, progress,
                                                          store, found)
    greedy_tokens = greedy_output.tokens
    runs, outputs = {f"greedy/b{batch}": greedy}, {f"greedy/b{batch}": greedy_output}
    known_stop_tokens = None
    for method in methods:
        key = f"{method.name}/b{batch}"
        found = _reuse(store, key, method.tokens_per_step, greedy_reused)
        if found is not None:
            runs[key], outputs[key], stops = found
            known_stop_tokens = _chunks(stops, batch)
            continue
        results = decode_chunks(decoding, method, prompts, batch, progress)
        known_stop_tokens = [r.stop_tokens for r in results]
        w = method.tokens_per_step
        runs[key], outputs[key] = _keep(store, key, w, *_drafting_run(
            method.name, w, batch, results, greedy, greedy_tokens),
            [s for r in results for s in r.stop_tokens])
    _oracle_run(decoding, prompts, batch, oracle_k, progress, store, runs, outputs,
                known_stop_tokens, greedy_reused)
    return runs, outputs


def _oracle_run(decoding: Decoding, prompts: list, batch: int, oracle_k: Optional[int],
                progress: bool, store: RunStore, runs: dict, outputs: dict,
                known_stop_tokens: Optional[list], greedy_reused: bool) -> None:
    """oracle/b<batch> into runs and outputs (None oracle_k: nothing), after greedy's run."""
    if oracle_k is None:
        return
    key = f"oracle/b{batch}"
    found = _reuse(store, key, oracle_k, greedy_reused)
    if found is not None:
        runs[key], outputs[key], _ = found
        return
    greedy, greedy_tokens = runs[f"greedy/b{batch}"], outputs[f"greedy/b{batch}"].tokens
    oracles = oracle_methods(decoding, oracle_k, prompts, batch, greedy_tokens,
                             known_stop_tokens)
    results = decode_chunks(decoding, oracles, prompts, batch, progress)
    runs[key], outputs[key] = _keep(store, key, oracle_k, *_drafting_run(
        "oracle", oracle_k, batch, results, greedy, greedy_tokens))


def _continuous_results(decoding: Decoding, method: Method, prompts: list, batch: int,
                        progress: bool) -> list:
    """All `prompts` through `batch` refilled slots -> [ContinuousResult]."""
    key = f"{method.name}/b{batch}/continuous"
    with tqdm(total=len(prompts), desc=key, disable=not progress, unit="prompt",
              leave=False) as bar:
        return [decoding.continuous(method, prompts, batch, on_finished=bar.update)]


def _continuous_record(method: Method, batch: int, results: list, static_greedy: dict,
                       greedy_tokens: list, continuous_greedy: Optional[dict]
                       ) -> tuple[dict, Output]:
    """The run record of `results` (one ContinuousResult per queue, in prompt order)."""
    stats = pooled(results)
    tokens = [t for r in results for t in r.tokens]
    run = {"method": method.name, "batch_size": batch, "schedule": "continuous", **stats,
           "loop_iterations": sum(r.loop_iterations for r in results),
           "prefill_calls": sum(r.prefill_calls for r in results),
           "speedup_vs_static_greedy": stats["tokens_per_second"] /
           static_greedy["tokens_per_second"], **against_greedy(tokens, greedy_tokens)}
    if method.drafts:
        w = method.tokens_per_step
        run.update(k=w, speedup=stats["tokens_per_second"] /
                   continuous_greedy["tokens_per_second"], **mtp_summary(results, w))
    records = [rec for r in results for rec in r.row_records()] if method.drafts else None
    return run, Output(tokens, records)


def _continuous_run(decoding: Decoding, method: Method, prompts: list, batch: int,
                    static_greedy: dict, greedy_tokens: list, continuous_greedy: Optional[dict],
                    progress: bool) -> tuple[dict, Output]:
    results = _continuous_results(decoding, method, prompts, batch, progress)
    return _continuous_record(method, batch, results, static_greedy, greedy_tokens,
                              continuous_greedy)


def _bracketed_continuous_runs(decoding: Decoding, methods: Sequence[Method], prompts: list,
                               batch: int, static_greedy: dict, greedy_tokens: list,
                               progress: bool, store: RunStore, keep_greedy: bool,
                               repeats: int = 1) -> tuple[dict, dict]:
    """Greedy's continuous run, then per drafter its run and greedy's again (G D1 G D2 G):
    each drafter's `speedup` is over the mean seconds of the greedy runs before and after it
    (recorded: `greedy_tokens_per_second`, `greedy_bracket_seconds`). repeats > 1: each
    drafter's run and greedy's after it `repeats` times (G D1 G D1 G ... D2 G), `speedup` the
    mean of the repeats' bracketed ratios (`_repeated`). keep_greedy: the first greedy run is
    greedy/b<B>/continuous (else a stored one is). Each run is saved as it ends."""
    runs, outputs, key = {}, {}, f"greedy/b{batch}/continuous"
    before = _continuous_results(decoding, GREEDY, prompts, batch, progress)
    greedy, greedy_output = _continuous_record(GREEDY, batch, before, static_greedy,
                                               greedy_tokens, None)
    if keep_greedy:
        runs[key], outputs[key] = _keep(store, key, 1, {**greedy, "bracketed": True},
                                        greedy_output)
    for method in methods:
        drafter_seconds, greedy_seconds, first = [], [pooled(before)["seconds"]], None
        for _ in range(repeats):
            results = _continuous_results(decoding, method, prompts, batch, progress)
            before = _continuous_results(decoding, GREEDY, prompts, batch, progress)
            first = first or results
            if [t for r in results for t in r.tokens] != [t for r in first for t in r.tokens]:
                raise RepeatMismatch(f"--continuous-repeats: {method.name}/b{batch}/continuous "
                                     f"decoded other tokens in a repeat than in its first run")
            drafter_seconds.append(pooled(results)["seconds"])
            greedy_seconds.append(pooled(before)["seconds"])
        baseline = {"tokens_per_second": greedy["tokens"] / float(np.mean(greedy_seconds[:2]))}
        run, output = _continuous_record(method, batch, first, static_greedy, greedy_tokens,
                                         baseline)
        run.update(bracketed=True, greedy_tokens_per_second=baseline["tokens_per_second"],
                   greedy_bracket_seconds=[round(s, 4) for s in greedy_seconds])
        if repeats > 1:
            run.update(_repeated(run["tokens"], greedy["tokens"], drafter_seconds,
                                 greedy_seconds))
            run["speedup_vs_static_greedy"] = (run["tokens_per_second"] /
                                               static_greedy["tokens_per_second"])
        name = f"{method.name}/b{batch}/continuous"
        runs[name], outputs[name] = _keep(store, name, method.tokens_per_step, run, output)
    return runs, outputs


def _repeated(tokens: int, greedy_tokens: int, drafter_seconds: list, greedy_seconds: list
              ) -> dict:
    """A drafter's continuous runs D_i (`tokens` each), each between greedy's G_i and G_i+1
    (`greedy_tokens`) -> the record's fields: speedup_repeats, D_i's tokens per second over
    greedy's at the mean seconds of G_i and G_i+1; `speedup` their mean, `speedup_sd` their
    sample sd; `seconds` / `tokens_per_second` the drafter's mean over the repeats,
    `greedy_tokens_per_second` greedy's over all its runs here (so speedup is close to, not
    exactly, their ratio). prefill_seconds, batch_seconds and the step statistics stay the
    first repeat's (the repeats decode the same tokens)."""
    ratios = [tokens / d / (greedy_tokens / ((g0 + g1) / 2)) for d, g0, g1 in
              zip(drafter_seconds, greedy_seconds, greedy_seconds[1:])]
    mean_seconds = float(np.mean(drafter_seconds))
    return {"speedup": float(np.mean(ratios)), "speedup_sd": float(np.std(ratios, ddof=1)),
            "speedup_repeats": [round(r, 4) for r in ratios], "repeats": len(ratios),
            "drafter_repeat_seconds": [round(d, 4) for d in drafter_seconds],
            "seconds": mean_seconds, "tokens_per_second": tokens / mean_seconds,
            "greedy_tokens_per_second": greedy_tokens / float(np.mean(greedy_seconds))}


def _sequential_continuous_runs(decoding: Decoding, methods: Sequence[Method], prompts: list,
                                batch: int, static_greedy: dict, greedy_tokens: list,
                                progress: bool, store: RunStore, greedy: Optional[dict]
                                ) -> tuple[dict, dict]:
    """Greedy's continuous run (unless `greedy`, a stored one, is given), then each drafter's,
    each saved as it ends; a drafter's speedup is over that one greedy run."""
    runs, outputs, key = {}, {}, f"greedy/b{batch}/continuous"
    if greedy is None:
        runs[key], outputs[key] = _keep(store, key, 1, *_continuous_run(
            decoding, GREEDY, prompts, batch, static_greedy, greedy_tokens, None, progress))
        greedy = runs[key]
    for method in methods:
        name = f"{method.name}/b{batch}/continuous"
        runs[name], outputs[name] = _keep(store, name, method.tokens_per_step, *_continuous_run(
            decoding, method, prompts, batch, static_greedy, greedy_tokens, greedy, progress))
    return runs, outputs


def continuous_runs(decoding: Decoding, methods: Sequence[Method], prompts: list, batch: int,
                    static_greedy: dict, greedy_tokens: list, progress: bool,
                    store: Optional[RunStore] = None, interleave: bool = False,
                    repeats: int = 1) -> tuple[dict, dict]:
    """Greedy and each drafter (not the oracle: its references are per batch row) through
    `batch` continuously refilled slots. `speedup` is over continuous greedy (the same
    scheduler), `speedup_vs_static_greedy` over `greedy/b<batch>`. interleave: each drafter
    bracketed by greedy's runs. A stored greedy run is reused only where the static greedy run
    was, a stored drafter's only where greedy's was; the others run (bracketed: with greedy's
    runs around them again). repeats (with interleave): each drafter's bracketed run that many
    times (`_bracketed_continuous_runs`)."""
    store = store or RunStore(None, {})
    if interleave:     # bracketed runs are not the runs timed against one greedy run
        store = store.with_settings(continuous_baseline="bracketed",
                                    **({"continuous_repeats": repeats} if repeats > 1 else {}))
    greedy_key = f"greedy/b{batch}/continuous"
    found = _reuse(store, greedy_key, 1, bool(static_greedy.get("reused")))  # looked up once
    runs, outputs, missing = {}, {}, []
    if found is not None:
        runs[greedy_key], outputs[greedy_key], _ = found
    for method in methods:
        key = f"{method.name}/b{batch}/continuous"
        stored = _reuse(store, key, method.tokens_per_step, found is not None)
        if stored is None:
            missing.append(method)
        else:
            runs[key], outputs[key], _ = stored
    args = (decoding, missing, prompts, batch, static_greedy, greedy_tokens, progress, store)
    if interleave and missing:
        new_runs, new_outputs = _bracketed_continuous_runs(*args, keep_greedy=found is None,
                                                           repeats=repeats)
    else:
        new_runs, new_outputs = _sequential_continuous_runs(
            *args, greedy=None if found is None else runs[greedy_key])
    runs.update(new_runs)
    outputs.update(new_outputs)
    order = [greedy_key] + [f"{m.name}/b{batch}/continuous" for m in methods]
    return {k: runs[k] for k in order}, {k: outputs[k] for k in order}


def decode_batch_size(decoding: Decoding, methods: Sequence[Method], prompts: list, batch: int, *,
                      oracle_k: Optional[int] = None, continuous: bool = False,
                      interleave: bool = False, progress: bool = True,
                      store: Optional[RunStore] = None, continuous_repeats: int = 1
                      ) -> tuple[dict, dict]:
    """Every run of batch size `batch` -> (run records, outputs), in report order."""
    runs, outputs = static_runs(decoding, methods, prompts, batch, oracle_k, progress, store,
                                interleave)
    if continuous and batch > 1:
        more_runs, more_outputs = continuous_runs(
            decoding, methods, prompts, batch, runs[f"greedy/b{batch}"],
            outputs[f"greedy/b{batch}"].tokens, progress, store, interleave,
            continuous_repeats)
        runs.update(more_runs)
        outputs.update(more_outputs)
    return runs, outputs
