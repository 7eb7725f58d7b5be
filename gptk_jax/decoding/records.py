"""The JSON record of one generated row (`python -m gptk_jax.generate --output-json`): the prompt,
its generated ids and text, why it stopped, its batch's timing and, for draft-and-verify
decoding, the verify steps and drafts accepted per step; `summarize` is the run's one line.
"""

from __future__ import annotations


def _record(decoding: str, i: int, prompts: list[str], ids: list[list[int]], tok, tokens: list,
            stop_reason: str, num_generated: int, more: dict) -> dict:
    return {"index": i, "prompt": prompts[i], "prompt_tokens": len(ids[i]),
            "generated_ids": tokens, "text": tok.decode(tokens), "stop_reason": stop_reason,
            "num_generated": num_generated, "decoding": decoding, **more}


def row_record(i: int, prompts: list[str], ids: list[list[int]], tok, row, stop_set: set, *,
               decoding: str, batch_size: int) -> dict:
    """The record of prompt i from its RowRecord as its row finishes (continuous batching):
    the fields of `batch_records` but the run's timing."""
    from gptk_jax.decoding.results import split_stop

    tokens, reason, _ = split_stop(row.tokens, stop_set)
    more = {} if decoding == "greedy" else {
        "verify_steps": len(row.accepted), "accepted_per_step": list(row.accepted),
        "emitted_per_step": list(row.emitted)}
    return _record(decoding, i, prompts, ids, tok, tokens, reason, len(row.tokens),
                   {**more, "batch": 0, "batch_size": batch_size})


def batch_records(batch_index: int, rows: list[int], prompts: list[str], ids: list[list[int]],
                  tok, result, *, decoding: str, batch_size: int, continuous: bool) -> list[dict]:
    """One JSON record per row of a finished batch (continuous: the one run's rows)."""
    seconds = result.prefill_seconds + result.decode_seconds
    batch_tokens = int(sum(result.num_generated))
    timing = {"batch": batch_index,
              "batch_size": batch_size if continuous else len(rows),
              "prefill_s": round(result.prefill_seconds, 6),
              "decode_s": round(result.decode_seconds, 6),
              "compile_s": round(result.compile_seconds, 6),
              "tokens_per_s": round(batch_tokens / seconds, 3) if seconds > 0 else None}
    # decoders may add per-row fields (mtp: verify steps, accepted drafts per step)
    extra = result.row_records() if hasattr(result, "row_records") and \
        decoding != "greedy" else None
    records = []
    for j, i in enumerate(rows):
        more = {k: v for k, v in extra[j].items()
                if k not in ("tokens", "stop_reason", "num_generated")} if extra else {}
        records.append(_record(decoding, i, prompts, ids, tok, result.tokens[j],
                               result.stop_reasons[j], result.num_generated[j],
                               {**more, **timing}))
    return records


def summarize(records: list[dict]) -> str:
    batches = {r["batch"]: r for r in records}.values()
    tokens = sum(r["num_generated"] for r in records)
    seconds = sum(b["prefill_s"] + b["decode_s"] for b in batches)
    compile_s = sum(b["compile_s"] for b in batches)
    rate = f"{tokens / seconds:.1f}" if seconds > 0 else "n/a"
    return (f"{len(records)} prompts, {tokens} tokens in {seconds:.2f}s ({rate} tokens/s; "
            f"prefill {sum(b['prefill_s'] for b in batches):.2f}s, "
            f"decode {sum(b['decode_s'] for b in batches):.2f}s; compile {compile_s:.1f}s apart)")
