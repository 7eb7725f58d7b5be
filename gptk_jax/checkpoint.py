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
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from gptk_jax.config import ConfigError, LlamaConfig
from gptk_jax.model import abstract_params, params_for_model

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


def save_converted(out_dir: str | os.PathLike, config: LlamaConfig, params: dict, *,
                   write_tokenizer: Optional[Callable[[Path], None]] = None,
                   provenance: Optional[dict] = None, overwrite: bool = False) -> Path:
    """Writes a converted model folder atomically. `params` in the stacked layout."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {out} already exists (pass --overwrite to replace)")
    check_shapes(params, config, source=f"conversion to {out}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {out.parent}: {e}") from None
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        (tmp / CONFIG_FILE).write_text(config.to_json())
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PARAMS_DIR, params)
        ckptr.wait_until_finished()
        if write_tokenizer is not None:
            (tmp / TOKENIZER_DIR).mkdir()
            write_tokenizer(tmp / TOKENIZER_DIR)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance or {}, indent=2, default=str))
        if out.exists():  # overwrite: move the old one aside only once the new one is complete
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR)
    check_shapes(params, config, source=str(path / PARAMS_DIR))
    tokenizer = None
    if load_tokenizer:
        from gptk_jax.tokenizers import load_tokenizer as _load_tok
        tokenizer = _load_tok(path / TOKENIZER_DIR)
    return ConvertedModel(config=config, params=params_for_model(params, config),
                          tokenizer=tokenizer, path=path)
