"""Trained MTP heads on disk: params + HeadConfig + the fingerprint of the trunk they fit.

    HEADS_DIR/heads.json   {"format": 1, "head_config": {…}, "trunk": {name, dim, vocab_size,
                            n_layers}, "metadata": {…}}
    HEADS_DIR/params/      orbax checkpoint of the head params (the head's own tree only)
    HEADS_DIR/draft_vocab.json  only for heads trained with a softmax over a draft vocabulary
                           (loss.draft_vocab_size): {"ids": [U], "size", "sha256" (of the ids
                           as a JSON list), "source", ...}; heads.json's "draft_vocab" names
                           the file, size and sha256. Evaluation drafts over these ids by default.

Written atomically (a hidden sibling folder renamed into place). Loading with the trunk's config
refuses heads made for another trunk (width, vocabulary or depth differ) with an error that names
both; a different trunk *name* only warns (the same model converted to another folder).
`gptk_jax.decoding.head_drafter` turns loaded heads into the drafter the decoding loop runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from gptk_jax.errors import GptkError
from gptk_jax.files import atomic_folder
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.heads.config import HeadConfig, HeadConfigError

FORMAT_VERSION = 1
META_FILE = "heads.json"
VOCAB_FILE = "draft_vocab.json"
PARAMS_DIR = "params"
FINGERPRINT_FIELDS = ("dim", "vocab_size", "n_layers")


class HeadsError(GptkError, ValueError):
    """A heads folder that is incomplete, or made for another trunk."""


@dataclasses.dataclass
class LoadedHeads:
    head_config: HeadConfig
    params: Any
    trunk: dict       # fingerprint of the trunk the heads were trained on
    metadata: dict
    path: Path
    draft_vocab: Optional[tuple] = None   # ids the heads were trained to draft over (or None)
    draft_vocab_record: Optional[dict] = None   # draft_vocab.json without the ids


def trunk_fingerprint(trunk_config: LlamaConfig, name: str) -> dict:
    return {"name": str(name), **{f: getattr(trunk_config, f) for f in FINGERPRINT_FIELDS}}


def check_compatible(saved: dict, trunk_config: LlamaConfig, trunk_name: Optional[str] = None, *,
                     source: str = "heads") -> None:
    """Raises HeadsError when the heads were trained for a trunk of another shape."""
    now = trunk_fingerprint(trunk_config, trunk_name or "?")
    wrong = [f"{f} {saved.get(f)} (heads) != {now[f]} (trunk)" for f in FINGERPRINT_FIELDS
             if saved.get(f) != now[f]]
    if wrong:
        raise HeadsError(f"{source} were trained for trunk {saved.get('name')!r}, not for this "
                         f"trunk {now['name']!r}: " + "; ".join(wrong))
    if trunk_name is not None and saved.get("name") not in (None, trunk_name):
        warnings.warn(f"{source} were trained on trunk {saved.get('name')!r}, loading them for "
                      f"{trunk_name!r} (same dim/vocab/depth)")


def _abstract_head_params(head_config: HeadConfig, trunk_config: LlamaConfig) -> Any:
    """Shapes of the head's own params (jax.eval_shape of its init)."""
    from gptk_jax.heads import init_head_params, make_head
    from gptk_jax.llama.model import init_params

    head = make_head(head_config, trunk_config)
    return jax.eval_shape(lambda: init_head_params(
        head, init_params(trunk_config, jax.random.PRNGKey(0)), jax.random.PRNGKey(0)))


def _check_param_shapes(params: Any, expected: Any, source: str) -> None:
    exp = {jax.tree_util.keystr(k): tuple(v.shape)
           for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): tuple(np.shape(v))
           for k, v in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"missing {n} {exp[n]}" for n in sorted(set(exp) - set(got))]
    problems += [f"unexpected {n} {got[n]}" for n in sorted(set(got) - set(exp))]
    problems += [f"{n}: {got[n]} != expected {exp[n]}" for n in sorted(set(got) & set(exp))
                 if got[n] != exp[n]]
    if problems:
        raise HeadsError(f"{source}: head params do not match the HeadConfig: "
                         + "; ".join(problems))


def _vocab_sha256(ids) -> str:
    from gptk_jax.training.vocab import vocab_sha256
    return vocab_sha256(ids)


def _check_vocab_ids(ids, vocab_size: int, source: str) -> tuple:
    try:
        ids = tuple(int(i) for i in ids)
    except (TypeError, ValueError):
        raise HeadsError(f"{source}: draft vocabulary ids must be integers") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= vocab_size:
        raise HeadsError(f"{source}: the draft vocabulary must be distinct ids in "
                         f"[0, {vocab_size}), {len(ids)} given")
    return ids


def save_heads(out_dir: str | os.PathLike, head_config: HeadConfig, head_params: Any,
               trunk_config: LlamaConfig, trunk_name: str, *, metadata: Optional[dict] = None,
               overwrite: bool = False, draft_vocab: Optional[dict] = None) -> Path:
    """Writes HEADS_DIR atomically after checking the params against the head's own shapes.
    draft_vocab: {"ids": [...], ...} (training/trainer.py), written as VOCAB_FILE with its
    size and sha256 (a list / tuple of ids is accepted too)."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise HeadsError(f"heads folder {out} already exists (pass overwrite=True to replace)")
    _check_param_shapes(head_params, _abstract_head_params(head_config, trunk_config),
                        f"saving heads to {out}")
    meta = {"format": FORMAT_VERSION, "head_config": head_config.to_dict(),
            "trunk": trunk_fingerprint(trunk_config, trunk_name), "metadata": metadata or {}}
    vocab = None
    if draft_vocab is not None:
        vocab = dict(draft_vocab) if isinstance(draft_vocab, dict) else {"ids": draft_vocab}
        ids = _check_vocab_ids(vocab.get("ids", ()), trunk_config.vocab_size,
                               f"saving heads to {out}")
        vocab.update(ids=list(ids), size=len(ids), sha256=_vocab_sha256(ids))
        meta["draft_vocab"] = {"file": VOCAB_FILE, "size": len(ids), "sha256": vocab["sha256"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        if vocab is not None:
            (tmp / VOCAB_FILE).write_text(json.dumps(vocab, default=str))
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PARAMS_DIR, jax.device_get(head_params))
        ckptr.wait_until_finished()
    return out


def read_heads_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file() or not (path / PARAMS_DIR).is_dir():
        raise HeadsError(f"{path} is not a heads folder: expected {META_FILE} and {PARAMS_DIR}/ "
                         "(written by gptk_jax.heads.io.save_heads)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise HeadsError(f"{meta_file}: {e}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise HeadsError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    return meta


def load_heads(path: str | os.PathLike, trunk_config: Optional[LlamaConfig] = None,
               trunk_name: Optional[str] = None) -> LoadedHeads:
    """Loads HEADS_DIR; with trunk_config, refuses heads made for another trunk before reading
    any params."""
    path = Path(path).absolute()
    meta = read_heads_meta(path)
    try:
        hc = dict(meta["head_config"])
        if hc.get("offsets") is not None:
            hc["offsets"] = tuple(hc["offsets"])
        head_config = HeadConfig.from_dict(hc)
    except (KeyError, TypeError, HeadConfigError) as e:
        raise HeadsError(f"{path / META_FILE}: bad head_config: {e}") from None
    trunk = meta.get("trunk", {})
    if trunk_config is not None:
        check_compatible(trunk, trunk_config, trunk_name, source=f"heads in {path}")
    ids, vocab_record = read_draft_vocab(path, meta)
    params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR)
    if trunk_config is not None:
        _check_param_shapes(params, _abstract_head_params(head_config, trunk_config), str(path))
    return LoadedHeads(head_config=head_config, params=params, trunk=trunk,
                       metadata=meta.get("metadata", {}), path=path, draft_vocab=ids,
                       draft_vocab_record=vocab_record)


def read_draft_vocab(path: str | os.PathLike, meta: Optional[dict] = None):
    """-> (ids tuple, VOCAB_FILE's record without the ids) of a heads folder, (None, None) when
    the heads were trained over the whole vocabulary; a missing file or a sha256 that does not
    match the ids is a HeadsError."""
    path = Path(path)
    meta = read_heads_meta(path) if meta is None else meta
    entry = meta.get("draft_vocab")
    if not entry:
        return None, None
    vocab_file = path / str(entry.get("file", VOCAB_FILE))
    try:
        record = json.loads(vocab_file.read_text())
    except FileNotFoundError:
        raise HeadsError(f"{path / META_FILE} names a draft vocabulary {vocab_file.name}, "
                         "which is missing") from None
    except json.JSONDecodeError as e:
        raise HeadsError(f"{vocab_file}: {e}") from None
    vocab_size = (meta.get("trunk") or {}).get("vocab_size") or 1 << 62
    ids = _check_vocab_ids(record.get("ids", ()), vocab_size, str(vocab_file))
    sha = _vocab_sha256(ids)
    if sha != entry.get("sha256") or sha != record.get("sha256"):
        raise HeadsError(f"{vocab_file}: sha256 of its ids {sha[:12]}… does not match the "
                         f"recorded {str(entry.get('sha256'))[:12]}… (heads.json) / "
                         f"{str(record.get('sha256'))[:12]}… (file)")
    return ids, {k: v for k, v in record.items() if k != "ids"}

