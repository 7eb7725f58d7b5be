"""Self-distillation's generation: the trunk's own greedy translations of the sources, chunk by
chunk, with the product's exact decoding (continuous batching + prompt-lookup drafts), each
chunk appended and recorded before the next (the record and its resume checks: record.py).

Letters: N sources asked for, C chunk of sources decoded by one continuous run, B slots.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from gptk_jax.data.prompts import PromptFormat, encode_prompts
from gptk_jax.distillation.record import (DistillPlan, check_resume, chunk_entry, one_line,
                                          save_record)


def shot_sources(fmt: PromptFormat) -> frozenset:
    return frozenset(s.src.strip() for s in fmt.shots)


def distill_sources(model, fmt: PromptFormat, sources: Sequence[str], output: Path,
                    plan: DistillPlan, *, batch_size: int, tokens_per_step: int, chunk: int,
                    bos: Optional[bool], command: Sequence[str], progress: bool = True,
                    stop_after: Optional[int] = None, redo_damaged: bool = False,
                    log: Callable[[str], None] = print) -> dict:
    """Translates sources[lines already in output:] chunk by chunk; returns the record.
    `stop_after`: stop once that many lines are written this session (tests, time budgets).
    The caller holds `output_lock(output)`; `check_resume` says what may be resumed."""
    from tqdm import tqdm

    tok = model.tokenizer
    record = check_resume(plan, output, sources, redo_damaged=redo_damaged, log=log)
    done = record["lines_written"]
    record["decoding"] = plan.decoding
    todo = list(range(done, len(sources)))
    if stop_after is not None:
        todo = todo[:stop_after]
    session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "first_line": done,
               "lines": 0, "empty_lines": 0, "generated_tokens": 0, "seconds": 0.0,
               "command": list(command), "decoding": plan.decoding}
    record["sessions"].append(session)
    save_record(output, record)         # before the output exists: a file without one is not ours
    if not todo:
        return record
    decoder = _decoder(model, tokens_per_step)
    excluded = shot_sources(fmt)
    bar = tqdm(total=len(sources), initial=done, desc="distill", unit="line",
               disable=not progress, smoothing=0.1)
    with open(output, "a", encoding="utf-8") as out:
        for first in range(0, len(todo), chunk):
            lines = todo[first:first + chunk]
            start = time.perf_counter()
            texts, tokens = _translate(decoder, tok, fmt, [sources[i] for i in lines],
                                       excluded, batch_size, plan.max_new_tokens, bos)
            seconds = time.perf_counter() - start
            out.write("".join(t + "\n" for t in texts))
            out.flush()
            os.fsync(out.fileno())
            for key, value in (("lines", len(lines)), ("generated_tokens", tokens),
                               ("seconds", seconds)):
                session[key] += value
            empty = sum(1 for i, t in zip(lines, texts)
                        if not t and sources[i].rstrip("\r").strip()
                        and sources[i].rstrip("\r").strip() not in excluded)
            session["empty_lines"] = session.get("empty_lines", 0) + empty
            record["chunks"].append(chunk_entry(lines[0], [sources[i] for i in lines], texts))
            record["lines_written"] += len(lines)
            record["output_bytes"] += record["chunks"][-1]["bytes"]
            record["generated_tokens"] += tokens
            record["seconds"] += seconds
            save_record(output, record)
            bar.update(len(lines))
            bar.set_postfix(tok_s=f"{session['generated_tokens'] / max(session['seconds'], 1e-9):.0f}")
    bar.close()
    if session.get("empty_lines"):
        log(empty_lines_warning(output, session["empty_lines"], session["lines"]))
    return record


def empty_lines_warning(output: Path, empty: int, lines: int) -> str:
    """Translations that came out empty for non-empty sources (the trunk stopped at once: the
    prompt format does not suit it): training skips those pairs."""
    return (f"warning: {empty} of the {lines} lines written to {output} in this session are "
            f"empty although their sources are not (the trunk ended the translation at once; "
            f"training skips those pairs): check the prompt format for this model (--shots, "
            f"--space-with-target, --bos); the count is in the record's session "
            f"\"empty_lines\"")


def decoder_spec(tokens_per_step: int):
    """Greedy (W = 1), else prompt-lookup drafts, W tokens per verify step."""
    from gptk_jax.decoding.factory import GREEDY, DecoderSpec
    if tokens_per_step <= 1:
        return GREEDY
    return DecoderSpec("lookup", tokens_per_step=tokens_per_step)


def _decoder(model, tokens_per_step: int):
    from gptk_jax.data.prompts import translation_stop_ids
    from gptk_jax.decoding import factory

    return factory.make_decoder(model, decoder_spec(tokens_per_step),
                                stop_ids=translation_stop_ids(model.tokenizer))


def _translate(decoder, tok, fmt: PromptFormat, chunk: Sequence[str], excluded: frozenset,
               batch_size: int, max_new_tokens: int, bos: Optional[bool]
               ) -> tuple[list[str], int]:
    """One chunk of sources -> (one line per source, tokens generated)."""
    clean = [s.rstrip("\r").strip() for s in chunk]
    texts = [""] * len(clean)
    real = [i for i, s in enumerate(clean) if s and s not in excluded]
    if not real:
        return texts, 0
    prompts = encode_prompts(fmt, tok, [clean[i] for i in real], bos=bos)
    if len(real) <= batch_size:
        result = decoder.generate(prompts, max_new_tokens, batch_size=batch_size)
    else:
        result = decoder.generate_continuous(prompts, max_new_tokens, batch_size=batch_size)
    generated = 0
    for i, ids in zip(real, result.tokens):
        texts[i] = one_line(tok.decode(list(ids)))
        generated += len(ids)
    return texts, generated


__all__ = ["decoder_spec", "distill_sources", "empty_lines_warning", "shot_sources"]
