"""The converted-model folder: written atomically, loaded with one call.

    DIR/config.json        LlamaConfig fields
    DIR/params/            orbax checkpoint of the stacked params (see docs/design.md)
    DIR/tokenizer/         tokenizer files + tokenizer_config.json (gptk_jax.tokenizers)
    DIR/conversion.json    provenance: source format, input files, decisions taken

Writing goes to a hidden temporary sibling folder that is renamed into place only when complete,
so an interrupted or failed conversion leaves nothing that looks like a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from gptk_jax.files import atomic_folder
from gptk_jax.llama.config import ConfigError, LlamaConfig
from gptk_jax.llama.model import abstract_params, params_for_model

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
PROVENANCE_FILE = "conversion.json"


class CheckpointError(ValueError):
    """A folder that is not a (complete) converted model, or one that cannot be written."""


@dataclasses.dataclass
class ConvertedModel:
    config: LlamaConfig
    params: dict  # in the layout Llama(config) expects
    tokenizer: Any  # gptk_jax.tokenizers.Tokenizer, or None when load_tokenizer=False
    path: Path


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


def _restore_params(directory: Path) -> dict:
    """The saved tree as numpy arrays, read one array at a time: a whole-tree restore reads every
    array's (compressed) bytes concurrently, holding up to the size of the checkpoint on top of the
    params (1B model: peak 6.7 GB for 4.7 GiB of params; one at a time: 5.7 GB)."""
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    tree = ckptr.metadata(directory).item_metadata.tree
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for key_path, leaf_metadata in flat:
        keys = [k.key for k in key_path]
        item = leaf_metadata
        for key in reversed(keys):
            item = {key: item}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        value = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
        for key in keys:
            value = value[key]
        leaves.append(value)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def is_converted_model(path: str | os.PathLike) -> bool:
    """True for a folder this project wrote: config.json and conversion.json both present."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PROVENANCE_FILE).is_file()


def check_output_folder(out: str | os.PathLike, overwrite: bool) -> None:
    """Before any work: `out` may be replaced only if it is a converted model and `overwrite`
    is set (anything else there is never deleted), and its parent must be writable."""
    out = Path(out).absolute()
    if out.exists():
        if not overwrite:
            raise CheckpointError(f"output folder {out} already exists "
                                  "(pass --overwrite to replace it)")
        if not out.is_dir() or not is_converted_model(out):
            raise CheckpointError(f"--overwrite replaces only a converted model ({CONFIG_FILE} "
                                  f"and {PROVENANCE_FILE} present); {out} is not one: refusing "
                                  "to delete it")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {out}: {parent or out.parent} is not writable")


def check_finite(params: dict, *, source: str, chunk: int = 1 << 22) -> None:
    """Raises CheckpointError naming every tensor holding NaN or infinity (read in chunks of
    `chunk` elements: no second copy of a tensor in memory)."""
    problems = []
    for key, leaf in jax.tree_util.tree_leaves_with_path(params):
        flat = np.asarray(leaf).reshape(-1)
        for start in range(0, flat.size, chunk):
            if not np.isfinite(flat[start:start + chunk]).all():
                bad = sum(int((~np.isfinite(flat[i:i + chunk])).sum())
                          for i in range(start, flat.size, chunk))
                first = start + int(np.argmin(np.isfinite(flat[start:start + chunk])))
                problems.append(f"tensor {jax.tree_util.keystr(key)} has {bad} non-finite "
                                f"value(s) (NaN or inf; first at flat index {first})")
                break
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems) + " -- the source file is "
                              "corrupt or was written wrong")


def save_converted(out_dir: str | os.PathLike, config: LlamaConfig, params: dict, *,
                   write_tokenizer: Optional[Callable[[Path], None]] = None,
                   provenance: Optional[dict] = None, overwrite: bool = False,
                   log: Optional[Callable[[str], None]] = None) -> Path:
    """Writes a converted model folder atomically. `params` in the stacked layout; every tensor
    must be finite; an existing `out_dir` is replaced only if it is a converted model."""
    out = Path(out_dir).absolute()
    check_output_folder(out, overwrite)
    check_shapes(params, config, source=f"conversion to {out}")
    check_finite(params, source=f"conversion to {out}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {out.parent}: {e}") from None
    with atomic_folder(out, log=log) as tmp:
        (tmp / CONFIG_FILE).write_text(config.to_json())
        _save_params(tmp / PARAMS_DIR, params)
        if write_tokenizer is not None:
            (tmp / TOKENIZER_DIR).mkdir()
            write_tokenizer(tmp / TOKENIZER_DIR)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance or {}, indent=2, default=str))
    return out


def load_config(path: str | os.PathLike) -> LlamaConfig:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder (expected a converted model from "
                              "`python -m convert`)")
    if not cfg_file.is_file() or not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path} is not a converted model: expected {CONFIG_FILE} and "
                              f"{PARAMS_DIR}/ (made by `python -m convert`)")
    try:
        return LlamaConfig.from_dict(json.loads(cfg_file.read_text()), source=str(cfg_file))
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def load_converted(path: str | os.PathLike, *, scan_layers: Optional[bool] = None,
                   dtype: Optional[str] = None, load_tokenizer: bool = True) -> ConvertedModel:
    """Loads config, params (as numpy/jax arrays in the model's layout) and tokenizer."""
    path = Path(path).absolute()
    config = load_config(path)
    changes = {}
    if scan_layers is not None:
        changes["scan_layers"] = scan_layers
    if dtype is not None:
        changes["dtype"] = dtype
    config = config.replace(**changes) if changes else config
    params = _restore_params(path / PARAMS_DIR)
    check_shapes(params, config, source=str(path / PARAMS_DIR))
    tokenizer = None
    if load_tokenizer:
        from gptk_jax.tokenizers import load_tokenizer as _load_tok
        tokenizer = _load_tok(path / TOKENIZER_DIR)
    return ConvertedModel(config=config, params=params_for_model(params, config),
                          tokenizer=tokenizer, path=path)
