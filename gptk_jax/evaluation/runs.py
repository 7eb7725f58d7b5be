"""Decoding runs of one batch size, and their statistics.

`decode_batch_size` decodes every prompt with greedy, then with each drafting method and the
oracle, in consecutive static batches of B prompts; with `continuous`, and B > 1, greedy and each
drafter again through B continuously refilled slots. It returns run records (report.json's
`runs`) and `Output`s (tokens per prompt, per-row step records), both keyed
`<method>/b<B>` or `<method>/b<B>/continuous`. Decoding itself goes through `decode.Decoding`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from tqdm import tqdm

from gptk_jax.decoding.acceptance import acceptance_stats
from gptk_jax.evaluation.decode import GREEDY, Decoding, Method, oracle_method


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


def pooled(results: list) -> dict:
    """Totals of a list of GenerationResult / MTPResult / ContinuousResult."""
    tokens = sum(r.total_generated for r in results)
    seconds = sum(r.prefill_seconds + r.decode_seconds for r in results)
    return {"tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds > 0 else None,
            "compile_seconds": sum(r.compile_seconds for r in results),
            "trunk_calls": sum(r.num_steps for r in results)}


def mtp_summary(results: list, k: int) -> dict:
    accepted = [a for r in results for row in r.stats["accepted_per_row"] for a in row]
    emitted = [e for r in results for row in r.stats["emitted_per_row"] for e in row]
    return acceptance_stats(accepted, emitted, num_drafts=k - 1)


def against_greedy(tokens: list, greedy_tokens: list) -> dict:
    return {"identical_to_greedy": tokens == greedy_tokens,
            "rows_differing_from_greedy": sum(a != b for a, b in zip(tokens, greedy_tokens))}


def oracle_methods(decoding: Decoding, k: int, prompts: list, batch: int, greedy_results: list,
                   known_stop_tokens: Optional[list]) -> list[Method]:
    """Per batch, an oracle drafting greedy's continuation plus the stop id the row ended on
    (from an earlier draft-and-verify run of the same batch; without one, an untimed oracle pass
    finds it), so every draft is accepted."""
    methods = []
    for i, chunk in enumerate(_chunks(prompts, batch)):
        stops = (known_stop_tokens[i] if known_stop_tokens else decoding.batch(
            oracle_method(decoding, k, chunk, [[0]] * len(chunk), batch), chunk,
            batch).stop_tokens)
        conts = [t + [s] if s is not None else t
                 for t, s in zip(greedy_results[i].tokens, stops)]
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


def static_runs(decoding: Decoding, methods: Sequence[Method], prompts: list, batch: int,
                oracle_k: Optional[int], progress: bool) -> tuple[dict, dict]:
    """Greedy, each drafting method, then the oracle (K = oracle_k; None: no oracle)."""
    greedy_results = decode_chunks(decoding, GREEDY, prompts, batch, progress)
    greedy_tokens = [t for r in greedy_results for t in r.tokens]
    greedy = {"method": "greedy", "batch_size": batch, **pooled(greedy_results)}
    runs, outputs = {f"greedy/b{batch}": greedy}, {f"greedy/b{batch}": Output(greedy_tokens)}
    known_stop_tokens = None
    for method in methods:
        results = decode_chunks(decoding, method, prompts, batch, progress)
        known_stop_tokens = [r.stop_tokens for r in results]
        key = f"{method.name}/b{batch}"
        runs[key], outputs[key] = _drafting_run(method.name, method.k, batch, results, greedy,
                                                greedy_tokens)
    if oracle_k is not None:
        oracles = oracle_methods(decoding, oracle_k, prompts, batch, greedy_results,
                                 known_stop_tokens)
        results = decode_chunks(decoding, oracles, prompts, batch, progress)
        runs[f"oracle/b{batch}"], outputs[f"oracle/b{batch}"] = _drafting_run(
            "oracle", oracle_k, batch, results, greedy, greedy_tokens)
    return runs, outputs


def continuous_runs(decoding: Decoding, methods: Sequence[Method], prompts: list, batch: int,
                    static_greedy: dict, greedy_tokens: list, progress: bool
                    ) -> tuple[dict, dict]:
    """Greedy and each drafter (not the oracle: its references are per batch row) through
    `batch` continuously refilled slots. `speedup` is over continuous greedy (the same
    scheduler), `speedup_vs_static_greedy` over `greedy/b<batch>`."""
    runs, outputs = {}, {}
    for method in (GREEDY, *methods):
        key = f"{method.name}/b{batch}/continuous"
        with tqdm(total=len(prompts), desc=key, disable=not progress, unit="prompt",
                  leave=False) as bar:
            result = decoding.continuous(method, prompts, batch, on_finished=bar.update)
        stats = pooled([result])
        run = {"method": method.name, "batch_size": batch, "schedule": "continuous", **stats,
               "loop_iterations": result.loop_iterations, "prefill_calls": result.prefill_calls,
               "speedup_vs_static_greedy": stats["tokens_per_second"] /
               static_greedy["tokens_per_second"], **against_greedy(result.tokens, greedy_tokens)}
        if method.drafts:
            run.update(k=method.k, speedup=stats["tokens_per_second"] /
                       runs[f"greedy/b{batch}/continuous"]["tokens_per_second"],
                       **mtp_summary([result], method.k))
        runs[key] = run
        outputs[key] = Output(result.tokens, result.row_records() if method.drafts else None)
    return runs, outputs


def decode_batch_size(decoding: Decoding, methods: Sequence[Method], prompts: list, batch: int, *,
                      oracle_k: Optional[int] = None, continuous: bool = False,
                      progress: bool = True) -> tuple[dict, dict]:
    """Every run of batch size `batch` -> (run records, outputs), in report order."""
    runs, outputs = static_runs(decoding, methods, prompts, batch, oracle_k, progress)
    if continuous and batch > 1:
        more_runs, more_outputs = continuous_runs(
            decoding, methods, prompts, batch, runs[f"greedy/b{batch}"],
            outputs[f"greedy/b{batch}"].tokens, progress)
        runs.update(more_runs)
        outputs.update(more_outputs)
    return runs, outputs
