"""Prompts a user gives in a file, and their token ids (what `python -m gptk_jax.generate`
reads with --input-file / --prompt).

    read_prompts(path)            # one prompt per line of a text file, or a .jsonl file of
                                  # strings or {"prompt": ...} objects
    encode_all(prompts, model, bos)   # ids under the one BOS rule, each checked against the model

Every problem is a `PromptFileError` naming the file and line (or the prompt's index).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from gptk_jax.errors import GptkError


class PromptFileError(GptkError, ValueError):
    """A prompt file that cannot be read, or a prompt that cannot be encoded for the model."""


UsageError = PromptFileError   # the names the functions below were written with


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per line) or a .jsonl file (strings or {"prompt": ...})."""
    return [prompt for _, prompt in read_prompt_lines(path)]


def read_prompt_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, prompt) of each prompt in a text or .jsonl file (see read_prompts)."""
    if not path.is_file():
        raise UsageError(f"--input-file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--input-file {path}: cannot read it as UTF-8 text ({e})") from None
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{number}: invalid JSON ({e})") from None
            if isinstance(item, dict):
                item = item.get("prompt")
            if not isinstance(item, str):
                raise UsageError(f'{path}:{number}: expected a JSON string or an object with a '
                                 f'"prompt" string')
            line = item
        prompts.append((number, line))
    if not prompts:
        raise UsageError(f"--input-file {path} holds no prompts (it is empty or blank)")
    return prompts


def encode_all(prompts: Sequence[str], model, bos: Optional[bool],
               where: Optional[Sequence[str]] = None) -> list[list[int]]:
    """Every prompt's ids under the one BOS rule (`encode_prompt`), each checked against the
    model's embedding, before anything is decoded. A prompt that is not valid text (a lone
    surrogate: a byte of --prompt that is not UTF-8, or "\\ud800" in a JSON line), encodes to no
    tokens or holds an id past the embedding is a UsageError naming its index (and `where`)."""
    from gptk_jax.llama.checkpoint import CheckpointError
    from gptk_jax.tokenizers import encode_prompt

    ids = []
    for i, text in enumerate(prompts):
        name = f"prompt {i}" + (f" ({where[i]})" if where else "")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UsageError(f"{name}: not valid UTF-8 text ({text[e.start]!r} at character "
                             f"{e.start}: a byte that is not UTF-8 or a lone surrogate)") from None
        try:
            prompt_ids = list(encode_prompt(model.tokenizer, text, bos))
        except Exception as e:   # the tokenizer's own refusal, whatever its type
            raise UsageError(f"{name}: cannot be encoded ({type(e).__name__}: {e})") from None
        if not prompt_ids:
            raise UsageError(f"{name} encodes to no tokens; give it text or pass --bos")
        try:
            model.check_token_ids(prompt_ids)
        except CheckpointError as e:
            raise UsageError(f"{name}: {e}") from None
        ids.append(prompt_ids)
    return ids
