"""What training reads: the frozen trunk and the WMT text, turned into grain pipelines.

    trunk = load_trunk(settings, workdir)          # converted folder, or 'random-tiny' (tests)
    train_pipe, eval_pipe = build_pipelines(settings, trunk.tokenizer)

'random-tiny' writes a tiny random Llama (2 layers, width 32) with a byte-level tokenizer into
WORKDIR/random-tiny-trunk once, through the same `save_converted` folder format, so tests and
smoke runs exercise the real loading path without any model download.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from gptk_jax.llama.checkpoint import CheckpointError, load_converted, save_converted
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.data.pipeline import PipelineConfig, TranslationPipeline
from gptk_jax.data.prompts import PromptFormat, few_shot_from
from gptk_jax.data.wmt import (DataError, Pair, lines_in_range, read_parallel_text,
                              read_text_lines)
from gptk_jax.training.settings import RANDOM_TINY, DataSettings, RunSettings, TrainingError

TINY_TRUNK_DIR = "random-tiny-trunk"


@dataclasses.dataclass
class Trunk:
    config: LlamaConfig
    params: dict          # model layout (`Llama(config)`), host / default device
    tokenizer: Any
    name: str             # for the heads' trunk fingerprint
    path: Path


# --------------------------------------------------------------------------------------------
# Trunk
# --------------------------------------------------------------------------------------------

def _write_byte_tokenizer(folder: Path) -> None:
    """Byte-level BPE without merges: 256 byte tokens + <|bos|> <|eos|> <|pad|> (256..258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|bos|>", "<|eos|>", "<|pad|>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"kind": "hf_json", "bos_id": 256, "eos_id": 257, "pad_id": 258, "stop_ids": [257],
         "add_bos": True}, indent=2))


def tiny_trunk_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=259, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                       rope_theta=10000.0, max_seq_len=2048)


def ensure_tiny_trunk(folder: Path, seed: int = 0) -> Path:
    """Writes the random tiny trunk into `folder` unless it is there (same seed: same weights)."""
    if (folder / "config.json").is_file():
        return folder
    from gptk_jax.llama.model import init_params
    config = tiny_trunk_config()
    params = jax.jit(lambda key: init_params(config, key))(jax.random.PRNGKey(seed))  # one compile
    try:
        save_converted(folder, config, jax.device_get(params), write_tokenizer=_write_byte_tokenizer,
                       provenance={"source": "random-tiny", "seed": seed})
    except (CheckpointError, OSError):
        if not (folder / "config.json").is_file():    # not a concurrent writer that won
            raise
    return folder


def single_process(code: str) -> None:
    """Runs Python `code` in a fresh single-process interpreter. Folder writers that save with
    orbax (save_converted, heads_io.save_heads) are single-writer: under jax.distributed their
    orbax calls would wait for the other processes, so multi-process runs write from here."""
    import subprocess
    import sys
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise TrainingError(f"single-process helper failed:\n{proc.stderr[-3000:]}")


def load_trunk(settings: RunSettings, workdir: Path) -> Trunk:
    if settings.trunk_checkpoint == RANDOM_TINY:
        path = workdir / TINY_TRUNK_DIR
        if jax.process_count() > 1:
            single_process("from pathlib import Path; from gptk_jax.training.inputs import "
                           f"ensure_tiny_trunk; ensure_tiny_trunk(Path({str(path)!r}))")
        else:
            ensure_tiny_trunk(path)
        name = RANDOM_TINY
    else:
        path = Path(settings.trunk_checkpoint)
        name = path.name
    try:
        model = load_converted(path, dtype=settings.trunk_dtype)
    except CheckpointError as e:
        raise TrainingError(f"config.trunk_checkpoint={settings.trunk_checkpoint!r}: {e}") from None
    return Trunk(config=model.config, params=model.params, tokenizer=model.tokenizer, name=name,
                 path=path)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

def _pairs_with_target_file(prefix: str, src_lang: str, target_file: Path,
                            max_pairs: Optional[int], line_range: tuple = ()) -> list[Pair]:
    """Sources from PREFIX.src paired line by line with `target_file`: as many lines, or the
    trunk's own translations of the first N sources from `python -m gptk_jax.distill` (its
    record FILE.json says N; a partial file without one is refused). `line_range` (first, last):
    only those 1-based lines of both (a range past the target file's lines is refused). A
    distillation whose sources or lines changed since it was written (its record's
    fingerprints differ) is refused naming the first line that differs."""
    from gptk_jax.distillation.record import DistillError, target_lines_check

    sources = read_text_lines(f"{prefix}.{src_lang}")
    targets = read_text_lines(target_file)
    try:                  # a distillation's lines are checked against its record's fingerprints
        target_lines_check(target_file, f"{prefix}.{src_lang}", len(targets), len(sources),
                           sources=sources, targets=targets)
    except DistillError as e:
        raise DataError(str(e)) from None
    sources = lines_in_range(sources, line_range, f"{prefix}.{src_lang}")
    targets = lines_in_range(targets, line_range, str(target_file))
    pairs = []
    for src, tgt in zip(sources, targets):
        src, tgt = src.rstrip("\r").strip(), tgt.rstrip("\r").strip()
        if src and tgt:
            pairs.append(Pair(src, tgt))
            if max_pairs is not None and len(pairs) >= max_pairs:
                break
    return pairs


def _error_text(error: Exception, path, what: str) -> str:
    """An error reading `what` in one line: an OSError names its file and says what to do
    (files.os_error_text, not a raw "[Errno 21] Is a directory"); any other, its text."""
    from gptk_jax.errors import GptkError
    if isinstance(error, OSError) and not isinstance(error, GptkError):
        from gptk_jax.files import os_error_text
        return os_error_text(error, error.filename or path, f"{what} file")
    return str(error)


def read_train_pairs(data: DataSettings) -> list[Pair]:
    """The first `max_train_pairs` pairs over the train prefixes (each within its
    `train_line_ranges` entry), in order."""
    pairs: list[Pair] = []
    targets = data.train_target_files or (None,) * len(data.train_prefixes)
    ranges = data.train_line_ranges or ((),) * len(data.train_prefixes)
    for prefix, target_file, lines in zip(data.train_prefixes, targets, ranges):
        left = None if data.max_train_pairs is None else data.max_train_pairs - len(pairs)
        if left == 0:
            break
        try:
            if target_file:
                pairs += _pairs_with_target_file(prefix, data.src_lang, Path(target_file), left,
                                                 lines)
            else:
                pairs += read_parallel_text(prefix, data.src_lang, data.tgt_lang,
                                            max_pairs=left, line_range=lines).pairs
        except (OSError, DataError) as e:
            raise TrainingError(f"config.data.train_prefixes: cannot read {prefix}: "
                                f"{_error_text(e, prefix, 'training text')}") from None
    return pairs


def prompt_format(data: DataSettings) -> PromptFormat:
    shots = ()
    if data.shots:
        try:
            pool = read_parallel_text(data.shots_prefix, data.src_lang, data.tgt_lang).pairs
            shots = few_shot_from(pool, data.shots)
        except (OSError, DataError, ValueError) as e:
            said = _error_text(e, data.shots_prefix, "few-shot text")
            raise TrainingError(f"config.data.shots_prefix: {said}") from None
    return PromptFormat.for_languages(data.src_lang, data.tgt_lang, shots=shots,
                                      space_with_target=data.space_with_target)


def warn_distilled_format(data: DataSettings, used: dict, log) -> None:
    """Warns when a target file from `gptk_jax.distill` was made with another prompt format
    than the rows are built with (the heads would learn output of prompts they never see)."""
    from gptk_jax.data.prompts import compare_prompt_records
    from gptk_jax.distillation.record import DistillError, read_record

    for target_file in tuple(data.train_target_files or ()) + \
            ((data.eval_target_file,) if data.eval_target_file else ()):
        try:
            recorded = read_record(Path(target_file))
        except DistillError as e:
            raise TrainingError(f"config.data.train_target_files: {e}") from None
        warning = compare_prompt_records(
            used, (recorded or {}).get("prompt_format"), used_by="training",
            recorded_by=f"the distillation {target_file}")
        if warning:
            log(warning)


def build_pipelines(settings: RunSettings, tokenizer, fmt: PromptFormat,
                    with_eval: bool = True) -> tuple[TranslationPipeline, Optional[TranslationPipeline]]:
    data, batch = settings.data, settings.training.global_batch_size
    common = dict(max_len=data.max_len, max_offset=settings.max_offset, truncate=data.truncate,
                  bucket_lengths=data.bucket_lengths)
    pairs = read_train_pairs(data)
    try:
        train = TranslationPipeline(pairs, tokenizer, fmt, PipelineConfig(
            global_batch_size=batch, seed=settings.seed, shuffle=True, num_epochs=None,
            drop_remainder=True, **common))
    except ValueError as e:
        raise TrainingError(f"training set ({len(pairs)} pairs from "
                            f"{list(data.train_prefixes)}): {e}") from None
    evaluation = None
    if with_eval and data.eval_prefix and data.eval_reference:
        prefix = data.eval_prefix
        try:
            eval_pairs = read_parallel_text(prefix, data.src_lang, data.tgt_lang,
                                            max_pairs=data.eval_max_sentences,
                                            line_range=data.eval_line_range)
            evaluation = TranslationPipeline(eval_pairs, tokenizer, fmt, PipelineConfig(
                global_batch_size=batch, shuffle=False, num_epochs=1, drop_remainder=False,
                **common))
        except (OSError, ValueError, DataError) as e:
            raise TrainingError(f"evaluation set {prefix}: "
                                f"{_error_text(e, prefix, 'evaluation text')}") from None
    return train, evaluation


def build_distilled_eval(settings: RunSettings, tokenizer,
                         fmt: PromptFormat) -> Optional[TranslationPipeline]:
    """The validation rows of `data.eval_target_file`: eval_prefix's sources (the same lines
    as the reference evaluation: eval_line_range, eval_max_sentences) with the trunk's own
    translations as targets; None when no file is set."""
    data = settings.data
    if not (data.eval_prefix and data.eval_target_file):
        return None
    try:
        pairs = _pairs_with_target_file(data.eval_prefix, data.src_lang,
                                        Path(data.eval_target_file), data.eval_max_sentences,
                                        data.eval_line_range)
        return TranslationPipeline(pairs, tokenizer, fmt, PipelineConfig(
            global_batch_size=settings.training.global_batch_size, shuffle=False, num_epochs=1,
            drop_remainder=False, max_len=data.max_len, max_offset=settings.max_offset,
            truncate=data.truncate, bucket_lengths=data.bucket_lengths))
    except (OSError, ValueError, DataError) as e:
        said = _error_text(e, data.eval_target_file, "evaluation text")
        raise TrainingError(f"config.data.eval_target_file {data.eval_target_file} (sources "
                            f"{data.eval_prefix}.{data.src_lang}): {said}") from None


def positions_per_row(pipe: TranslationPipeline, offsets: tuple, first_target_tokens_only: bool,
                      multiple: int = 8) -> int:
    """M: the most positions any row of `pipe` supervises (rounded up to `multiple`, at most
    max_len). A position t has a target for offset o when t+o is a target token, so a row of
    prompt p and length L supervises t in [max(0, p - max offset), L - min offset)."""
    if first_target_tokens_only:
        return 1
    lo, hi = min(offsets), max(offsets)
    most = max(len(r.tokens) - lo - max(0, r.prompt_len - hi) for r in pipe.rows)
    most = max(1, -(-most // multiple) * multiple)
    return int(min(most, pipe.config.max_len))


def row_lengths(pipe: TranslationPipeline) -> np.ndarray:
    return np.asarray([len(r.tokens) for r in pipe.rows])
