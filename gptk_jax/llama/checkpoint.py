"""The converted-model folder: written atomically, loaded with one call.

    DIR/config.json        LlamaConfig fields
    DIR/params/            orbax checkpoint of the stacked params (see docs/design.md)
    DIR/tokenizer/         tokenizer files + tokenizer_config.json (gptk_jax.tokenizers)
    DIR/conversion.json    provenance: source format, input files, decisions taken

Writing goes to a hidden temporary sibling folder that is renamed into place only when complete,
so an interrupted or failed conversion leaves nothing that looks like a model. Loading checks the
folder before trusting it: anything missing or malformed (config.json, params/, tokenizer/,
conversion.json) is a CheckpointError naming the folder and the part.

Tokenizer ids past the embedding: `python -m convert` refuses a tokenizer with more ids than the
model has embedding rows unless `--allow-small-vocab` is given (tiny test models beside a real
tokenizer), which conversion.json records as `"allow_small_vocab": true`. `load_converted`
refuses such a folder unless that record is there, and then returns a `ConvertedModel` whose
`allow_small_vocab` is True: `embedding_rows` (= config.vocab_size) is the bound every token id
fed to the model must respect, and `check_token_ids` raises for ids at or past it (whose logits
would be NaN); encoders of prompts for such a model should call it. The padding id is always a
row of the embedding (padded rows of a batch read it): when the tokenizer's pad id has no row,
conversion writes the tokenizer's eos id as pad_id (else bos, else 0) into tokenizer/
tokenizer_config.json and records both in conversion.json (`"pad_id": {"tokenizer", "chosen"}`);
a folder converted before this is given the same choice on load, with a warning.

Weights are verified on load: `save_converted` records in conversion.json a digest of every
tensor's bytes as written (`"tensor_digests": {"algorithm": "xxh3_128", "tensors": {"layers.
attention.wq.kernel": "<hex>", ...}}`, named as the tensor's folder under params/), and
`load_converted` recomputes each one as the tensor is read and raises a CheckpointError naming
the tensor, its folder and both digests when one differs (a flipped bit, a zeroed block, a
truncated or replaced chunk file). "xxh3_128" (llama/weight_checks.py) is xxHash's 128-bit XXH3
from the `xxhash` package: ~0.016 s over SmolLM2-135M's 538 MB, where "sums64" (column and row
sums of 64-bit words, the digest before it) took ~0.045 s, CRC-32 ~0.13 s and sha256 ~0.30 s
(docs/benchmarks.md). It is a check against damage, not against an adversary (the folder's own
conversion.json could be rewritten as easily as a tensor). Folders whose conversion.json
records "sums64", "crc32" or "sha256" digests (converted by earlier versions) are verified
with those; an unknown algorithm is refused with a message to convert again. It runs in a
thread beside the reading of the next tensor. `load_converted(verify_digests=False)`, the CLIs'
`--no-verify-weights` (generate, evaluate, distill) or the environment variable
GPTK_SKIP_WEIGHT_DIGESTS=1 skips it; a folder converted before digests
were recorded loads with a warning saying its weights cannot be checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from gptk_jax.errors import GptkError
from gptk_jax.files import atomic_folder, read_json_object
from gptk_jax.llama.config import ConfigError, LlamaConfig
from gptk_jax.llama.model import abstract_params, params_for_model
from gptk_jax.llama.weight_checks import (  # noqa: F401  (tensor_digest: re-exported)
    DIGEST_ALGORITHM, DIGESTS_KEY, PROVENANCE_FILE, DigestChecker, check_finite, tensor_digest,
    tensor_digests, tensor_name)

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
SKIP_DIGESTS_ENV = "GPTK_SKIP_WEIGHT_DIGESTS"


class CheckpointError(GptkError, ValueError):
    """A folder that is not a (complete) converted model, or one that cannot be written."""


@dataclasses.dataclass
class ConvertedModel:
    config: LlamaConfig
    params: dict  # in the layout Llama(config) expects
    tokenizer: Any  # gptk_jax.tokenizers.Tokenizer, or None when load_tokenizer=False
    path: Path
    allow_small_vocab: bool = False  # converted with --allow-small-vocab (see module docstring)

    @property
    def embedding_rows(self) -> int:
        """Token ids the model can embed: [0, embedding_rows)."""
        return self.config.vocab_size

    def check_token_ids(self, ids) -> None:
        """Raises CheckpointError if any id has no embedding row (possible only when the
        tokenizer is larger than the embedding: a model converted with --allow-small-vocab)."""
        flat = np.asarray(ids, np.int64).reshape(-1)
        bad = flat[(flat < 0) | (flat >= self.embedding_rows)]
        if bad.size:
            raise CheckpointError(f"{self.path}: token id {bad[0]} has no embedding row (the "
                                  f"model embeds ids 0..{self.embedding_rows - 1}; its tokenizer "
                                  f"has {getattr(self.tokenizer, 'vocab_size', '?')} ids)")


def check_shapes(params: dict, config: LlamaConfig, *, source: str) -> None:
    """Raises CheckpointError naming every tensor whose path/shape differs from the model's own
    `jax.eval_shape(init)` (stacked layout)."""
    expected = {jax.tree_util.keystr(k): v.shape for k, v in
                jax.tree_util.tree_leaves_with_path(abstract_params(config))}
    got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in
           jax.tree_util.tree_leaves_with_path(params)}
    problems = []
    for name in sorted(set(expected) - set(got)):
        problems.append(f"missing tensor {name} (expected shape {expected[name]})")
    for name in sorted(set(got) - set(expected)):
        problems.append(f"unexpected tensor {name} with shape {got[name]}")
    for name in sorted(set(got) & set(expected)):
        if tuple(got[name]) != tuple(expected[name]):
            problems.append(f"tensor {name}: shape {got[name]}, expected {expected[name]}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


# Params are written as zstd-compressed zarr arrays in chunks of at most this many bytes, one file
# per chunk (no OCDBT). Measured on a 1.2 GB float32 tree (bench/bench_convert.py for the 1B model):
# orbax's default (StandardCheckpointer: NumpyHandler deep-copies every array, OCDBT buffers the
# compressed bytes of whole-array chunks until its data files are written) peaked at +1.47x the
# params; this layout stays within ~60 MB of them, and is faster.
_SAVE_CHUNK_BYTES = 16 << 20


def _save_params(directory: Path, params: dict) -> None:
    """Orbax save of host arrays without extra copies (see _SAVE_CHUNK_BYTES). Synchronous: the
    arrays are read in place, so they must not change until this returns (they do not)."""
    params = jax.tree.map(np.asarray, params)   # jax leaves -> host arrays (no copy on CPU)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, type_handler_registry=registry)
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=_SAVE_CHUNK_BYTES), params)
    ocp.Checkpointer(handler).save(directory, args=ocp.args.PyTreeSave(params,
                                                                        save_args=save_args))


def _restore_params(directory: Path, digests: Optional[dict] = None) -> dict:
    """The saved tree as numpy arrays, read one array at a time: a whole-tree restore reads every
    array's (compressed) bytes concurrently, holding up to the size of the checkpoint on top of the
    params (1B model: peak 6.7 GB for 4.7 GiB of params; one at a time: 5.7 GB). Whatever orbax
    cannot read is a CheckpointError naming `directory`. `digests` (conversion.json's
    "tensor_digests"): every tensor's digest is checked, in a thread beside the reading of the
    next one; a tensor that differs or has none recorded is a CheckpointError naming it."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: missing; a converted model keeps its weights there")
    if not any(directory.iterdir()):
        raise CheckpointError(f"{directory}: empty, no weights (an interrupted copy?)")
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        metadata = ckptr.metadata(directory)
    except Exception as e:  # orbax / tensorstore raise many types; all mean "not readable"
        raise _unreadable(directory, e) from None
    tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)  # None: unreadable
    if not isinstance(tree, dict) or not tree:
        raise CheckpointError(f"{directory}: no readable orbax checkpoint metadata (its "
                              "_METADATA file is missing or damaged): not the params of a "
                              "converted model, or an incomplete copy")
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    checker = DigestChecker(directory, digests) if digests is not None else None
    try:
        leaves = _restore_leaves(ckptr, directory, flat, checker)
        if checker is not None:
            checker.finish([tensor_name(k) for k, _ in flat])
    finally:
        if checker is not None:
            checker.pool.shutdown(wait=True, cancel_futures=True)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _restore_leaves(ckptr, directory: Path, flat, checker) -> list:
    leaves = []
    for key_path, leaf_metadata in flat:
        keys = [k.key for k in key_path]
        item = leaf_metadata
        for key in reversed(keys):
            item = {key: item}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        try:
            value = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
        except Exception as e:
            raise _unreadable(directory, e, tensor_name(key_path)) from None
        for key in keys:
            value = value[key]
        leaves.append(value)
        if checker is not None:
            checker.submit(tensor_name(key_path), value)
    return leaves


def _unreadable(directory: Path, error: Exception, tensor: Optional[str] = None) -> CheckpointError:
    text = str(error).strip().splitlines()
    why = f"{type(error).__name__}: {text[0][:200] if text else ''}"
    where = f" tensor {tensor} (its files under {directory / tensor})" if tensor else ""
    return CheckpointError(f"{directory}:{where} cannot be read as an orbax checkpoint ({why}); "
                           "the folder is damaged or incomplete")


def is_converted_model(path: str | os.PathLike) -> bool:
    """True for a folder this project wrote: config.json and conversion.json both present."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PROVENANCE_FILE).is_file()


MODEL_ENTRIES = (CONFIG_FILE, PARAMS_DIR, TOKENIZER_DIR, PROVENANCE_FILE)


def check_output_folder(out: str | os.PathLike, overwrite: bool) -> None:
    """Before any work: an empty folder `out` is written into (with or without `overwrite`); a
    non-empty one may be replaced only if it is a converted model holding nothing else and
    `overwrite` is set (anything else there is never deleted), and its parent must be
    writable."""
    out = Path(out).absolute()
    if out.is_dir() and not any(out.iterdir()):
        pass                      # an empty folder: nothing to lose, the model goes in its place
    elif out.exists() or out.is_symlink():
        if not out.is_dir():
            raise CheckpointError(f"--output {out} is a file, not a folder: choose a folder "
                                  "path for the converted model (the file was not touched)")
        if not overwrite:
            raise CheckpointError(f"output folder {out} already exists and is not empty "
                                  "(pass --overwrite to replace a converted model there)")
        if not is_converted_model(out):
            raise CheckpointError(f"--overwrite replaces only a converted model ({CONFIG_FILE} "
                                  f"and {PROVENANCE_FILE} present); {out} is not one: refusing "
                                  "to delete it")
        extra = sorted(p.name for p in out.iterdir() if p.name not in MODEL_ENTRIES)
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5
                                             else "")
            raise CheckpointError(f"--overwrite would delete {shown} in {out}, which a converted "
                                  "model does not hold: move them out of the folder first "
                                  "(nothing was changed)")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CheckpointError(f"cannot write {out}: {parent} is not a folder")
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {out}: {parent or out.parent} is not writable")




def save_converted(out_dir: str | os.PathLike, config: LlamaConfig, params: dict, *,
                   write_tokenizer: Optional[Callable[[Path], None]] = None,
                   provenance: Optional[dict] = None, overwrite: bool = False,
                   log: Optional[Callable[[str], None]] = None) -> Path:
    """Writes a converted model folder atomically. `params` in the stacked layout; every tensor
    must be finite; an existing `out_dir` is replaced only if it is a converted model."""
    out = Path(out_dir).absolute()
    check_output_folder(out, overwrite)
    check_shapes(params, config, source=f"conversion to {out}")
    start = time.perf_counter()
    check_finite(params, source=f"conversion to {out}")
    if log is not None:
        log(f"checked every weight finite in {time.perf_counter() - start:.1f} s")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from gptk_jax.files import os_error_reason
        raise CheckpointError(f"cannot create {out.parent}: "
                              f"{os_error_reason(e, out.parent, folder=True)}") from None
    start = time.perf_counter()
    provenance = dict(provenance or {}, **{DIGESTS_KEY: tensor_digests(params)})
    if log is not None:
        log(f"computed a {DIGEST_ALGORITHM} digest of every tensor in "
            f"{time.perf_counter() - start:.1f} s (checked on load)")
    with atomic_folder(out, log=log) as tmp:
        (tmp / CONFIG_FILE).write_text(config.to_json())
        _save_params(tmp / PARAMS_DIR, params)
        if write_tokenizer is not None:
            (tmp / TOKENIZER_DIR).mkdir()
            write_tokenizer(tmp / TOKENIZER_DIR)
            pad = _fit_pad_id(tmp / TOKENIZER_DIR, config)
            if pad is not None:
                provenance["pad_id"] = pad
                provenance["warnings"] = [*provenance.get("warnings", ()), pad["why"]]
                if log is not None:
                    log(f"warning: {pad['why']}")
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str))
    return out


def choose_pad_id(ids: dict, embedding_rows: int) -> int:
    """A padding id with an embedding row: the tokenizer's eos id if it has one, else its bos
    id, else 0 (padded positions are masked: any row does, as long as it exists)."""
    for key in ("eos_id", "bos_id"):
        value = ids.get(key)
        if isinstance(value, int) and 0 <= value < embedding_rows:
            return value
    return 0


def _pad_why(pad_id: int, chosen: int, embedding_rows: int, where: str) -> str:
    return (f"{where}: the tokenizer's pad id {pad_id} has no embedding row (the model embeds ids "
            f"0..{embedding_rows - 1}): padding with id {chosen} instead (padded positions are "
            f"masked; any existing row does)")


def _fit_pad_id(folder: Path, config: LlamaConfig) -> Optional[dict]:
    """Rewrites tokenizer_config.json's pad_id to a row of the embedding when it has none;
    returns the record of the choice (None: nothing changed)."""
    from gptk_jax.tokenizers.folder import CONFIG_FILE as TOKENIZER_CONFIG
    file = folder / TOKENIZER_CONFIG
    if not file.is_file():
        return None
    fields = read_json_object(file, CheckpointError)
    pad = fields.get("pad_id")
    if not isinstance(pad, int) or 0 <= pad < config.vocab_size:
        return None
    chosen = choose_pad_id(fields, config.vocab_size)
    fields["pad_id"] = chosen
    file.write_text(json.dumps(fields, indent=2))
    return {"tokenizer": pad, "chosen": chosen,
            "why": _pad_why(pad, chosen, config.vocab_size, "conversion")}


def load_config(path: str | os.PathLike) -> LlamaConfig:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder (expected a converted model from "
                              "`python -m convert`)")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a converted model: {cfg_file} is missing (made by "
                              "`python -m convert`)")
    try:
        fields = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    try:
        return LlamaConfig.from_dict(fields, source=str(cfg_file))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def read_provenance(path: str | os.PathLike) -> dict:
    """conversion.json as a dict; {} for a folder without one (not written by save_converted)."""
    file = Path(path) / PROVENANCE_FILE
    if not file.is_file():
        return {}
    return read_json_object(file, CheckpointError)


def _load_tokenizer(path: Path, config: LlamaConfig, allow_small_vocab: bool,
                    log: Callable[[str], None]):
    """The folder's tokenizer, refused if it has ids the embedding cannot hold and the folder
    was not converted with --allow-small-vocab."""
    from gptk_jax.tokenizers import TokenizerError, load_tokenizer

    folder = path / TOKENIZER_DIR
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: missing (the source checkpoint had no tokenizer?); "
                              "load the model with load_tokenizer=False")
    try:
        tokenizer = load_tokenizer(folder)
    except TokenizerError as e:
        raise CheckpointError(f"{path}: broken {TOKENIZER_DIR}/: {e}") from None
    if tokenizer.vocab_size > config.vocab_size and not allow_small_vocab:
        raise CheckpointError(
            f"{folder} has {tokenizer.vocab_size} token ids but {path / CONFIG_FILE} gives the "
            f"embedding {config.vocab_size} rows, and {PROVENANCE_FILE} does not record "
            "--allow-small-vocab: ids past the embedding would give NaN logits")
    if not 0 <= tokenizer.pad_id < config.vocab_size:   # a folder converted before pad fitting
        chosen = choose_pad_id({"eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id},
                               config.vocab_size)
        log(_pad_why(tokenizer.pad_id, chosen, config.vocab_size, str(folder)) +
            " (convert the model again to record it)")
        tokenizer._pad_id = chosen   # the tokenizer's own id is unusable: never fed to the model
    return tokenizer


def _verify_digests_default() -> bool:
    return os.environ.get(SKIP_DIGESTS_ENV, "").strip().lower() in ("", "0", "false", "no")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_converted(path: str | os.PathLike, *, scan_layers: Optional[bool] = None,
                   dtype: Optional[str] = None, load_tokenizer: bool = True,
                   verify_digests: Optional[bool] = None,
                   log: Callable[[str], None] = _warn) -> ConvertedModel:
    """Loads config, params (as numpy/jax arrays in the model's layout) and tokenizer; a folder
    with any part missing or malformed is a CheckpointError naming it. `verify_digests` (default:
    True unless GPTK_SKIP_WEIGHT_DIGESTS=1): check every tensor against conversion.json's digests
    (a mismatch is a CheckpointError naming the tensor); a folder without digests is loaded,
    with a warning through `log`, once every weight is checked finite (a non-finite one is a
    CheckpointError naming the tensor and rows). False skips both checks."""
    path = Path(path).absolute()
    config = load_config(path)
    provenance = read_provenance(path)
    allow_small_vocab = provenance.get("allow_small_vocab") is True
    if verify_digests is None:
        verify_digests = _verify_digests_default()
    digests = None
    if verify_digests:
        digests = provenance.get(DIGESTS_KEY)
        if digests is None:
            log(f"{path / PROVENANCE_FILE} records no tensor digests (converted by an older "
                "version): its weights cannot be checked for damage; convert it again to "
                "record them")
        elif not isinstance(digests, dict):
            raise CheckpointError(f"{path / PROVENANCE_FILE}: malformed {DIGESTS_KEY!r}; the "
                                  "folder is damaged")
    changes = {}
    if scan_layers is not None:
        changes["scan_layers"] = scan_layers
    if dtype is not None:
        changes["dtype"] = dtype
    try:
        config = config.replace(**changes) if changes else config
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    tokenizer = _load_tokenizer(path, config, allow_small_vocab, log) if load_tokenizer \
        else None
    params = _restore_params(path / PARAMS_DIR, digests)
    check_shapes(params, config, source=str(path / PARAMS_DIR))
    if verify_digests and digests is None:   # unverified weights: at least all finite
        check_finite(params, source=str(path / PARAMS_DIR),
                     blame="the converted folder's weights are broken (not the prompts): "
                           "convert the model again")
    return ConvertedModel(config=config, params=params_for_model(params, config),
                          tokenizer=tokenizer, path=path, allow_small_vocab=allow_small_vocab)
