"""Meta's consolidated checkpoint layout -> the canonical param tree (docs/design.md).

    INPUT/params.json            dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of, ...
    INPUT/consolidated.NN.pth    1..N model-parallel shards (NN = 00 .. N-1), torch zip format
    INPUT/tokenizer.model        tiktoken rank file (Llama 3) or sentencepiece model

Every .pth is opened with `torch.load(weights_only=True, mmap=True)`: a pickle that asks to run
code is refused, and tensors stay on disk until each one is converted, so memory holds about one
copy of the weights (the preallocated output arrays) plus one tensor in flight.

Shards are cut by fairscale's model-parallel layers, which Meta's llama3/model.py builds:
ColumnParallelLinear (wq, wk, wv, w1, w3, output) splits the weight's dim 0, RowParallelLinear
(wo, w2) dim 1, VocabParallelEmbedding (tok_embeddings) the vocabulary, dim 0 (fairscale 0.4.13
`VocabUtility.vocab_range_from_global_vocab_size`); RMSNorm weights are replicated. q/k rows are
in Meta's interleaved-pair RoPE layout and are permuted to half-split once concatenated.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from convert.common import (ConversionError, Converted, TORCH_SHAPES, check_tokenizer_fits,
                            empty_layer_stack, numpy_dtype, set_layer, torch_to_kernel)
from gptk_jax.files import sha256_file
from gptk_jax.llama.config import LlamaConfig, from_meta_params

PARAMS_FILE = "params.json"
TOKENIZER_FILE = "tokenizer.model"
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")
# Buffers some Meta checkpoints carry (Llama 2's precomputed RoPE frequencies): recomputed here.
IGNORED_TENSORS = ("rope.freqs",)

REPLICATED = None

# name inside `layers.{i}.` -> (canonical leaf path in params["layers"], shard split dim, kind)
LAYER_TABLE = {
    "attention_norm.weight": (("attention_norm", "scale"), REPLICATED, "norm"),
    "attention.wq.weight": (("attention", "wq", "kernel"), 0, "q"),
    "attention.wk.weight": (("attention", "wk", "kernel"), 0, "k"),
    "attention.wv.weight": (("attention", "wv", "kernel"), 0, "v"),
    "attention.wo.weight": (("attention", "wo", "kernel"), 1, "o"),
    "ffn_norm.weight": (("ffn_norm", "scale"), REPLICATED, "norm"),
    "feed_forward.w1.weight": (("feed_forward", "w1", "kernel"), 0, "ffn_in"),
    "feed_forward.w3.weight": (("feed_forward", "w3", "kernel"), 0, "ffn_in"),
    "feed_forward.w2.weight": (("feed_forward", "w2", "kernel"), 1, "ffn_out"),
}
# top-level name -> (canonical path, shard split dim, kind)
TOP_TABLE = {
    "tok_embeddings.weight": (("tok_embeddings", "embedding"), 0, "embedding"),
    "norm.weight": (("norm", "scale"), REPLICATED, "norm"),
    "output.weight": (("output", "kernel"), 0, "output"),
}



# --- files -------------------------------------------------------------------------------------

def _read_params_json(folder: Path) -> dict:
    path = folder / PARAMS_FILE
    if not path.is_file():
        raise ConversionError(f"{path}: not found; a Meta checkpoint folder has {PARAMS_FILE}, "
                              "consolidated.NN.pth and tokenizer.model")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(params, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(params).__name__}")
    return params


def find_shards(folder: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.{N-1}.pth, in rank order (gaps are an error)."""
    found = {}
    for p in folder.iterdir():
        m = SHARD_PATTERN.fullmatch(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise ConversionError(f"{folder}: no consolidated.NN.pth files")
    if sorted(found) != list(range(len(found))):
        raise ConversionError(f"{folder}: shard numbers {sorted(found)} are not 0..{len(found) - 1}")
    return [found[i] for i in range(len(found))]


def check_zip_crcs(path: Path) -> None:
    """A .pth in torch's zip format stores a CRC-32 per record; torch's reader does not check
    them, so damaged tensor bytes would load as (often non-finite) weights. The legacy non-zip
    format has no checksums."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return                          # legacy format (or not a zip: torch.load says which)
    except (OSError, EOFError, ValueError) as e:
        raise ConversionError(f"{path}: cannot be read as a PyTorch zip checkpoint, probably "
                              f"truncated or damaged ({_first_line(e)})") from None
    if bad is not None:
        raise ConversionError(f"{path}: record {bad} fails its CRC-32 check: the file is "
                              "damaged (re-download or re-copy it)")


def load_shard(path: Path) -> dict:
    """One .pth, memory-mapped, through torch's weights-only unpickler (no code runs), after
    its zip CRCs are checked."""
    import torch

    check_zip_crcs(path)
    try:
        state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; its "WeightsUnpickler error:" line says what was refused
        lines = [l.strip() for l in str(e).splitlines() if "WeightsUnpickler error" in l]
        why = lines[0].split(":", 1)[1].split(". Please")[0].strip() if lines else \
            _first_line(e)
        raise ConversionError(
            f"{path}: refused by torch's weights-only loader ({why}): the file's pickle asks to "
            "run code or build objects other than tensors, which a Meta checkpoint never "
            "needs; do not load it with weights_only=False") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot be read as a PyTorch zip checkpoint, probably "
                              f"truncated or damaged ({_first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ConversionError(f"{path}: expected a dict of tensor name -> tensor, "
                              f"got {type(state).__name__}")
    return state


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[:limit] + "..."


# --- names and shapes ----------------------------------------------------------------------------

def expected_names(n_layers: int, tied: bool) -> list[str]:
    """Every tensor name a Meta checkpoint holds, in conversion order."""
    names = ["tok_embeddings.weight"]
    names += [f"layers.{i}.{leaf}" for i in range(n_layers) for leaf in LAYER_TABLE]
    names += ["norm.weight"] + ([] if tied else ["output.weight"])
    return names


def _check_names(shards: list[dict], paths: list[Path], n_layers: int) -> bool:
    """Returns whether the embeddings are tied (no output.weight); raises on missing / extra."""
    tied = "output.weight" not in shards[0]
    want = set(expected_names(n_layers, tied))
    for state, path in zip(shards, paths):
        names = set(state) - set(IGNORED_TENSORS)
        missing, extra = sorted(want - names), sorted(names - want)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing tensors {missing}")
            if extra:
                parts.append(f"unexpected tensors {extra}")
            raise ConversionError(f"{path}: " + "; ".join(parts) +
                                  f" (params.json says n_layers={n_layers})")
    return tied


def _split_info(name: str) -> tuple[tuple, Optional[int], str, bool]:
    """(canonical path, split dim, kind, is_layer) for a Meta tensor name."""
    if name in TOP_TABLE:
        path, dim, kind = TOP_TABLE[name]
        return path, dim, kind, False
    leaf = name.split(".", 2)[2]
    path, dim, kind = LAYER_TABLE[leaf]
    return path, dim, kind, True


def _check_shapes(shards: list[dict], paths: list[Path], config: LlamaConfig,
                  names: list[str]) -> None:
    """Every shard's tensor must be its fairscale slice of the shape params.json implies."""
    n = len(shards)
    problems = []
    for name in names:
        _, dim, kind, _ = _split_info(name)
        full = TORCH_SHAPES[kind](config)
        want = list(full)
        if dim is not None:
            want[dim] = full[dim] // n if full[dim] % n == 0 else f"{full[dim]}/{n}"
        for state, path in zip(shards, paths):
            if not state[name].is_floating_point():
                problems.append(f"{path.name}: tensor {name} has dtype {state[name].dtype}, "
                                "expected a floating-point dtype")
                continue
            got = tuple(state[name].shape)
            if list(got) != want:
                sliced = "" if dim is None or n == 1 else \
                    f" (1/{n} of {full} along dim {dim})"
                problems.append(f"{path.name}: tensor {name} has shape {got}, expected "
                                f"{tuple(want)}{sliced}")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise ConversionError(f"{paths[0].parent}: tensors do not match params.json: "
                              + "; ".join(shown))


# --- tensors ------------------------------------------------------------------------------------

def _to_numpy(tensor, dtype) -> np.ndarray:
    """A torch tensor as a numpy array of `dtype` (bfloat16 through ml_dtypes, bit-exact)."""
    import torch

    if dtype == np.float32:
        return tensor.to(torch.float32).numpy()
    if tensor.dtype != torch.bfloat16:
        tensor = tensor.to(torch.bfloat16)  # round to nearest even, as ml_dtypes does
    return tensor.view(torch.int16).numpy().view(dtype)


def _torch_view(array: np.ndarray):
    """A torch tensor sharing `array`'s memory (float32, or bfloat16 through an int16 view)."""
    import torch

    if array.dtype == np.float32:
        return torch.from_numpy(array)
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)


def _vocab_matrix(kind: str, tensor, dtype) -> np.ndarray:
    """tok_embeddings [V,D] as is, output [V,D] -> kernel [D,V]: one strided, dtype-converting
    copy from the mapped file into the final array (no full-size temporaries: these are the
    largest tensors, 1 GB in float32 for Llama 3's vocabulary)."""
    source = tensor.T if kind == "output" else tensor
    out = np.empty(tuple(source.shape), dtype)
    _torch_view(out).copy_(source)
    return out


def _gather(name: str, shards: list[dict], paths: list[Path], dim: Optional[int]):
    """The full tensor: concatenated along the split dim, or the (checked) replicated copy."""
    import torch

    if dim is None:
        first = shards[0][name]
        for state, path in zip(shards[1:], paths[1:]):
            if not torch.equal(state[name], first):
                raise ConversionError(f"{path}: replicated tensor {name} differs from "
                                      f"{paths[0].name}'s copy")
        return first
    if len(shards) == 1:
        return shards[0][name]
    return torch.cat([state[name] for state in shards], dim=dim)


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", disable=None, leave=False)


def convert_tensors(shards: list[dict], paths: list[Path], config: LlamaConfig, dtype,
                    names: list[str]) -> dict:
    """Streams tensor by tensor into preallocated arrays; returns the canonical stacked tree."""
    layers = empty_layer_stack(config, dtype)
    params: dict = {"layers": layers}
    with _progress(len(names), "converting") as bar:
        for name in names:
            path, dim, kind, is_layer = _split_info(name)
            tensor = _gather(name, shards, paths, dim)
            if kind in ("embedding", "output"):
                value = _vocab_matrix(kind, tensor, dtype)
            else:  # at most a few times one layer's tensor in flight
                value = torch_to_kernel(kind, _to_numpy(tensor, dtype), config,
                                        interleaved_qk=True)
            del tensor
            if is_layer:
                set_layer(layers, path, int(name.split(".")[1]), value, name=name)
            else:  # a copy: `value` may still be a view of the memory-mapped file
                params.setdefault(path[0], {})[path[1]] = \
                    value if kind in ("embedding", "output") else np.array(value, copy=True)
            bar.update(1)
    return params


# --- tokenizer ----------------------------------------------------------------------------------

def tokenizer_writer(path: Path) -> tuple[Callable[[Path], None], str, int]:
    """Validates tokenizer.model now (before any weights are read) and returns the function that
    writes it into the converted folder, its kind and its vocabulary size."""
    from gptk_jax import tokenizers

    if not path.is_file():
        raise ConversionError(f"{path}: not found; a Meta checkpoint folder has {TOKENIZER_FILE}")
    try:
        kind = tokenizers.detect_tokenizer_model_kind(path)
        if kind == tokenizers.KIND_LLAMA3:
            vocab = tokenizers.Llama3Tokenizer(path).vocab_size
            write = tokenizers.write_llama3_tokenizer
        else:
            vocab = tokenizers.SentencePieceTokenizer(path).vocab_size
            write = tokenizers.write_sentencepiece_tokenizer
    except tokenizers.TokenizerError as e:
        raise ConversionError(str(e)) from None
    return (lambda folder: write(path, folder)), kind, vocab


# --- entry point --------------------------------------------------------------------------------

def read(input_path: Path, *, dtype: str = "float32", rope_scaling_factor: Optional[float] = None,
         scan_layers: bool = False, allow_small_vocab: bool = False) -> Converted:
    """Reads a Meta checkpoint folder (see module docstring) into a `Converted`;
    `allow_small_vocab`: see convert.common.check_tokenizer_fits."""
    folder = Path(input_path)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a folder; --format meta expects the folder with "
                              f"{PARAMS_FILE}, consolidated.NN.pth and {TOKENIZER_FILE}")
    np_dtype = numpy_dtype(dtype)
    meta_params = _read_params_json(folder)
    write_tokenizer, tokenizer_kind, tokenizer_vocab = tokenizer_writer(folder / TOKENIZER_FILE)
    paths = find_shards(folder)
    shards = [load_shard(p) for p in paths]

    n_layers = meta_params.get("n_layers")
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers <= 0:
        raise ConversionError(f"{folder / PARAMS_FILE}: " + (
            "missing field n_layers" if n_layers is None else
            f"n_layers must be a positive integer, got {n_layers!r}"))
    tied = _check_names(shards, paths, n_layers)
    embed_rows = shards[0]["tok_embeddings.weight"].shape[0] * len(shards)
    config = from_meta_params(meta_params, vocab_size=embed_rows,
                              rope_scaling_factor=rope_scaling_factor, tie_embeddings=tied,
                              source=str(folder / PARAMS_FILE), scan_layers=scan_layers,
                              param_dtype=dtype)
    names = expected_names(config.n_layers, tied)
    _check_shapes(shards, paths, config, names)
    ignored = sorted({n for s in shards for n in s} & set(IGNORED_TENSORS))

    shards_named = str(paths[0]) if len(paths) == 1 else f"{folder}/consolidated.*.pth"
    warnings = check_tokenizer_fits(
        tokenizer_vocab, config.vocab_size, tokenizer=str(folder / TOKENIZER_FILE),
        embedding=f"tok_embeddings.weight in {shards_named}", allow_small_vocab=allow_small_vocab)

    params = convert_tensors(shards, paths, config, np_dtype, names)
    del shards

    files = [folder / PARAMS_FILE, folder / TOKENIZER_FILE] + paths
    provenance = {
        "format": "meta",
        "input": str(folder.absolute()),
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
        "shards": len(paths),
        "dtype": dtype,
        "tie_embeddings": tied,
        "rope_scaling": config.rope_scaling_source,
        "rope_layout": "q/k rows permuted from Meta's interleaved pairs to half-split",
        "tokenizer_kind": tokenizer_kind,
        "tokenizer_vocab_size": tokenizer_vocab,
        "allow_small_vocab": allow_small_vocab,
        "ignored_tensors": ignored,
        "warnings": warnings,
    }
    return Converted(config=config, params=params, write_tokenizer=write_tokenizer,
                     provenance=provenance)
