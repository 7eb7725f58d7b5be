"""One self-distillation run: the arguments checked, the output locked, the model loaded and its
plan recorded, then the sources translated (generate.py). `python -m gptk_jax.distill` parses
flags and calls `distill`; tests and scripts call it directly.

    record = distill(checkpoint, "DATA/train/europarl-v7.first20k", "out/distilled.en",
                     max_pairs=800, tokens_per_step=4, shots=2, shots_prefix=PREFIX)

num_shards N > 1 with shard_index I translates lines I, I+N, ... into FILE.shardI-of-N
(shards.py; merging them is the caller's).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

from gptk_jax.data.prompts import prompt_format
from gptk_jax.data.wmt import read_text_lines
from gptk_jax.distillation.record import DistillError, output_lock, record_path
from gptk_jax.distillation.shards import check_shard_arguments, shard_path, shard_sources


def distill(checkpoint, input_prefix: str, output, *, max_pairs: Optional[int] = None,
            batch_size: int = 16, tokens_per_step: int = 4, chunk: int = 256,
            max_new_tokens: int = 128,
            src_lang: str = "de", tgt_lang: str = "en", shots: int = 0,
            shots_prefix=None, space_with_target: bool = False, bos: Optional[bool] = None,
            progress: bool = True, stop_after: Optional[int] = None,
            command: Sequence[str] = (), num_shards: int = 1,
            shard_index: Optional[int] = None, redo_damaged: bool = False,
            verify_weights: bool = True) -> dict:
    """Appends the translations of source lines [lines already in output, max_pairs) to
    `output`, holding its lock (FILE.lock) for the run; returns the record (FILE.json); with
    verify_weights False the checkpoint's tensor digests are not checked. num_shards N > 1:
    only lines shard_index, shard_index + N, ... into FILE.shardI-of-N (merged by the caller)."""
    _check_counts(batch_size=batch_size, tokens_per_step=tokens_per_step, chunk=chunk,
                  max_new_tokens=max_new_tokens, shots=shots, max_pairs=max_pairs)
    check_shard_arguments(num_shards, shard_index)
    source_path = f"{input_prefix}.{src_lang}"
    if Path(source_path).is_dir():
        raise DistillError(f"--input {input_prefix}: {source_path} is a folder; --input is the "
                           f"PREFIX of PREFIX.{src_lang}, a text file of source lines")
    sources = read_text_lines(source_path)
    if max_pairs is not None:
        sources = sources[:max_pairs]
    shard, all_sources = None, None
    if num_shards > 1:
        shard, all_sources = {"index": shard_index, "count": num_shards}, len(sources)
        sources = shard_sources(sources, shard_index, num_shards)
        output = shard_path(Path(output), shard_index, num_shards)
    output = _usable_output(Path(output))
    fmt = prompt_format(src_lang, tgt_lang, shots, space_with_target, shots_from=shots_prefix)
    with output_lock(output):
        return _distill_locked(checkpoint, fmt, source_path, sources, output, shard,
                               all_sources, bos=bos, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, tokens_per_step=tokens_per_step,
                               chunk=chunk, command=command, progress=progress,
                               stop_after=stop_after, redo_damaged=redo_damaged,
                               verify_weights=verify_weights)


def _check_counts(*, batch_size: int, tokens_per_step: int, chunk: int, max_new_tokens: int,
                  shots: int, max_pairs: Optional[int]) -> None:
    """DistillError naming the flag of the first count below its least value."""
    for name, value, low in (("--batch-size", batch_size, 1),
                             ("--tokens-per-step (--k)", tokens_per_step, 1),
                             ("--chunk", chunk, 1), ("--max-new-tokens", max_new_tokens, 1),
                             ("--shots", shots, 0)):
        if value < low:
            raise DistillError(f"{name} must be >= {low}, got {value}")
    if max_pairs is not None and max_pairs < 1:
        raise DistillError(f"--max-pairs must be >= 1, got {max_pairs}")


def _usable_output(output: Path) -> Path:
    """`output` once it is known to be a file (or nothing yet) whose record path is not a
    folder, its parent folder made; else DistillError naming the path."""
    if output.exists() and not output.is_file():
        raise DistillError(f"--output {output} is not a file: choose a file for the translations")
    if record_path(output).exists() and not record_path(output).is_file():
        raise DistillError(f"{record_path(output)} is a folder, where distill keeps the record "
                           f"of --output {output}: remove it or choose another --output")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from gptk_jax.files import os_error_text
        raise DistillError(os_error_text(e, output, "--output")) from None
    return output


def _distill_locked(checkpoint, fmt, source_path, sources, output, shard, all_sources, *, bos,
                    max_new_tokens, batch_size, tokens_per_step, chunk, command, progress,
                    stop_after, redo_damaged, verify_weights=True) -> dict:
    """The model loaded (after the checks that need no model), the run's plan, the sources
    translated; the caller holds the output's lock."""
    from gptk_jax.data.prompts import prompt_record, translation_stop_ids
    from gptk_jax.distillation.generate import distill_sources
    from gptk_jax.distillation.record import DistillPlan, check_resume, model_fingerprint
    from gptk_jax.llama.checkpoint import load_converted
    from gptk_jax.llama.weight_checks import verify_digests_arg

    if output.exists() and not record_path(output).is_file():   # refused before the model
        check_resume(None, output, sources)                      # loads, nothing changed
    model = load_converted(checkpoint, verify_digests=verify_digests_arg(verify_weights))
    stops = ",".join(map(str, translation_stop_ids(model.tokenizer)))
    plan = DistillPlan(
        input=str(Path(source_path).resolve()), sources=len(sources),
        prompt_format=prompt_record(fmt, model.tokenizer, bos),
        model=model_fingerprint(Path(checkpoint)), max_new_tokens=max_new_tokens,
        stop_ids_sha256=hashlib.sha256(stops.encode()).hexdigest()[:16],
        decoding={"batch_size": batch_size,
                  "drafter": "lookup" if tokens_per_step > 1 else "none",
                  "k": tokens_per_step, "chunk": chunk, "continuous": True},   # "k": W
        shard=shard, all_sources=all_sources)
    return distill_sources(model, fmt, sources, output, plan, batch_size=batch_size,
                           tokens_per_step=tokens_per_step, chunk=chunk, bos=bos,
                           command=command, progress=progress, stop_after=stop_after,
                           redo_damaged=redo_damaged)


__all__ = ["distill"]
