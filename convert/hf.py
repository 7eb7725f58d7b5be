"""HF transformers' Llama checkpoint folder -> the canonical param tree (docs/design.md).

    INPUT/config.json                      LlamaForCausalLM config (rope_scaling / rope_parameters)
    INPUT/model.safetensors                one file, or
    INPUT/model-0000N-of-0000M.safetensors + model.safetensors.index.json (sharded)
    INPUT/tokenizer.json (+ tokenizer_config.json, generation_config.json), or tokenizer.model

Every safetensors header is validated before any tensor is read (header length against the file
size, JSON, dtypes, every tensor's data_offsets inside the file, matching dtype x shape, no two
tensors overlapping), then the names and shapes are checked against config.json, and only then
are tensors streamed one by one (safetensors `safe_open`) into preallocated stacked arrays.
HF already stores q/k in the half-split RoPE layout: no permutation here.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from convert.common import (ConversionError, Converted, TORCH_SHAPES, check_tokenizer_fits,
                            empty_layer_stack, numpy_dtype, set_layer, torch_to_kernel)
from gptk_jax.files import read_json_object, sha256_file
from gptk_jax.llama.config import LlamaConfig, from_hf_config

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"

# Older transformers saved RoPE buffers; they are recomputed from config.json.
IGNORED_PATTERN = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# name inside `model.layers.{i}.` -> (canonical leaf path in params["layers"], kind)
LAYER_TABLE = {
    "input_layernorm.weight": (("attention_norm", "scale"), "norm"),
    "self_attn.q_proj.weight": (("attention", "wq", "kernel"), "q"),
    "self_attn.k_proj.weight": (("attention", "wk", "kernel"), "k"),
    "self_attn.v_proj.weight": (("attention", "wv", "kernel"), "v"),
    "self_attn.o_proj.weight": (("attention", "wo", "kernel"), "o"),
    "post_attention_layernorm.weight": (("ffn_norm", "scale"), "norm"),
    "mlp.gate_proj.weight": (("feed_forward", "w1", "kernel"), "ffn_in"),
    "mlp.up_proj.weight": (("feed_forward", "w3", "kernel"), "ffn_in"),
    "mlp.down_proj.weight": (("feed_forward", "w2", "kernel"), "ffn_out"),
}
# top-level name -> (canonical path, kind)
TOP_TABLE = {
    "model.embed_tokens.weight": (("tok_embeddings", "embedding"), "embedding"),
    "model.norm.weight": (("norm", "scale"), "norm"),
    "lm_head.weight": (("output", "kernel"), "output"),
}

# safetensors dtype -> bytes per element (the format's full list)
ST_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                  "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
                  "F64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


# --- safetensors headers ------------------------------------------------------------------------

def read_safetensors_header(path: Path) -> dict:
    """Parses and validates one file's header; returns {tensor name: (dtype, shape)}.

    Checks everything that could make a later read go wrong, before any tensor is read."""
    size = path.stat().st_size
    if size < 8:
        raise ConversionError(f"{path}: {size} bytes, too short for a safetensors file "
                              "(truncated?)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise ConversionError(f"{path}: header length {header_len} does not fit in the "
                                  f"{size}-byte file: not a safetensors file, or truncated")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: safetensors header is not a JSON object")
    data_size = size - 8 - header_len
    spans, tensors = [], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ConversionError(f"{where}: header entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ST_DTYPE_SIZES:
            raise ConversionError(f"{where}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
            raise ConversionError(f"{where}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))
                and offsets[0] <= offsets[1]):
            raise ConversionError(f"{where}: data_offsets {offsets!r} are not [begin, end]")
        begin, end = offsets
        if end > data_size:
            raise ConversionError(f"{where}: data_offsets [{begin}, {end}] run past the end of "
                                  f"the data ({data_size} bytes): the file is truncated or "
                                  "its header is corrupt")
        want = ST_DTYPE_SIZES[dtype] * math.prod(shape)   # Python ints: no int64 overflow
        if end - begin != want:
            raise ConversionError(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} "
                                  f"bytes, but {dtype} {tuple(shape)} needs {want}")
        spans.append((begin, end, name))
        tensors[name] = (dtype, tuple(shape))
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ConversionError(f"{path}: tensors {name_a} and {name_b} overlap in the file "
                                  "(corrupt header)")
    return tensors


def _is_uint(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def find_weight_files(folder: Path) -> tuple[list[Path], dict[str, tuple[str, tuple, Path]]]:
    """The safetensors files and {tensor name: (dtype, shape, file)}, headers all validated.

    With an index, its weight_map must agree with the files' headers exactly."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index_path}: not a safetensors index with a weight_map "
                                  f"({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index_path}: weight_map is empty or not an object")
        files = []
        for name in sorted(set(weight_map.values())):
            path = folder / name
            if Path(name).name != name or not path.is_file():
                raise ConversionError(f"{index_path}: names shard file {name!r}, which is not "
                                      f"in {folder}")
            files.append(path)
    elif (folder / SINGLE_FILE).is_file():
        weight_map, files = None, [folder / SINGLE_FILE]
    else:
        files = sorted(folder.glob("*.safetensors"))
        weight_map = None
        if not files:
            raise ConversionError(f"{folder}: no *.safetensors files (an HF Llama folder has "
                                  f"{SINGLE_FILE}, or shards and {INDEX_FILE})")

    tensors: dict[str, tuple[str, tuple, Path]] = {}
    for path in files:
        for name, (dtype, shape) in read_safetensors_header(path).items():
            if name in tensors:
                raise ConversionError(f"{path}: tensor {name} is also in "
                                      f"{tensors[name][2].name}")
            tensors[name] = (dtype, shape, path)
    if weight_map is not None:
        problems = [f"{name} is in {tensors[name][2].name}, index says {weight_map[name]}"
                    for name in sorted(set(tensors) & set(weight_map))
                    if tensors[name][2].name != weight_map[name]]
        problems += [f"{name} is listed for {weight_map[name]} but not in it"
                     for name in sorted(set(weight_map) - set(tensors))]
        problems += [f"{name} is in {tensors[name][2].name} but not in the index"
                     for name in sorted(set(tensors) - set(weight_map))]
        if problems:
            raise ConversionError(f"{index_path} disagrees with the shard files: "
                                  + "; ".join(_first(problems)))
    return files, tensors


def _first(items: list[str], n: int = 8) -> list[str]:
    return items[:n] + ([f"... and {len(items) - n} more"] if len(items) > n else [])


# --- names and shapes ---------------------------------------------------------------------------

def expected_names(n_layers: int, tied: bool) -> list[str]:
    """Every tensor an HF LlamaForCausalLM checkpoint holds, in conversion order."""
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{leaf}" for i in range(n_layers) for leaf in LAYER_TABLE]
    names += ["model.norm.weight"] + ([] if tied else ["lm_head.weight"])
    return names


def _kind(name: str) -> tuple[tuple, str, Optional[int]]:
    """(canonical path, kind, layer index or None) for an HF tensor name."""
    if name in TOP_TABLE:
        path, kind = TOP_TABLE[name]
        return path, kind, None
    _, _, layer, leaf = name.split(".", 3)
    path, kind = LAYER_TABLE[leaf]
    return path, kind, int(layer)


def check_tensors(tensors: dict, config: LlamaConfig, folder: Path) -> tuple[list[str], list[str]]:
    """Names and shapes against config.json; returns (names to convert, names ignored)."""
    names = expected_names(config.n_layers, config.tie_embeddings)
    ignored = sorted(n for n in tensors if IGNORED_PATTERN.fullmatch(n))
    if config.tie_embeddings and "lm_head.weight" in tensors:
        ignored.append("lm_head.weight")  # tied: transformers uses the embedding, so do we
    missing = [n for n in names if n not in tensors]
    extra = sorted(set(tensors) - set(names) - set(ignored))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors {_first(missing)}")
        if extra:
            parts.append(f"unexpected tensors {_first(extra)}")
        raise ConversionError(f"{folder}: " + "; ".join(parts) + f" ({CONFIG_FILE} says "
                              f"num_hidden_layers={config.n_layers}, tie_word_embeddings="
                              f"{config.tie_embeddings})")
    problems = []
    for name in names:
        dtype, shape, path = tensors[name]
        want = TORCH_SHAPES[_kind(name)[1]](config)
        if dtype not in FLOAT_DTYPES:
            problems.append(f"{path.name}: tensor {name} has dtype {dtype}, expected a float")
        elif shape != want:
            problems.append(f"{path.name}: tensor {name} has shape {shape}, expected {want}")
    if problems:
        raise ConversionError(f"{folder}: tensors do not match {CONFIG_FILE}: "
                              + "; ".join(_first(problems)))
    return names, ignored


# --- tensors ------------------------------------------------------------------------------------

class _TensorReader:
    """safe_open handles per file, opened on first use: numpy for F16/F32/F64, torch for BF16
    (numpy has no bfloat16; the bits are reinterpreted through ml_dtypes, exactly)."""

    def __init__(self):
        self._handles: dict = {}

    def get(self, name: str, st_dtype: str, path: Path, out_dtype) -> np.ndarray:
        from safetensors import safe_open

        framework = "pt" if st_dtype == "BF16" else "numpy"
        key = (path, framework)
        if key not in self._handles:
            try:
                self._handles[key] = safe_open(str(path), framework=framework)
            except Exception as e:  # safetensors raises its own SafetensorError
                raise ConversionError(f"{path}: cannot be opened by safetensors ({e})") from None
        try:
            tensor = self._handles[key].get_tensor(name)
        except Exception as e:
            raise ConversionError(f"{path}: tensor {name} cannot be read ({e})") from None
        if framework == "pt":
            import ml_dtypes
            import torch
            tensor = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.astype(out_dtype, copy=False)


def convert_tensors(tensors: dict, names: list[str], config: LlamaConfig, dtype) -> dict:
    """Streams tensor by tensor into preallocated stacked arrays; the canonical tree."""
    from tqdm import tqdm

    layers = empty_layer_stack(config, dtype)
    params: dict = {"layers": layers}
    reader = _TensorReader()
    for name in tqdm(names, desc="converting", unit="tensor", disable=None, leave=False):
        st_dtype, _, file = tensors[name]
        path, kind, layer = _kind(name)
        value = torch_to_kernel(kind, reader.get(name, st_dtype, file, dtype), config,
                                interleaved_qk=False)
        if kind in ("norm", "embedding"):
            value = np.array(value, copy=True)  # not a view of the memory-mapped file
        if layer is None:
            params.setdefault(path[0], {})[path[1]] = value
        else:
            set_layer(layers, path, layer, value, name=name)
    return params


# --- config and tokenizer -----------------------------------------------------------------------

def _read_json(path: Path, required: bool) -> Optional[dict]:
    if not path.is_file():
        if required:
            raise ConversionError(f"{path}: not found; an HF Llama folder has {CONFIG_FILE} and "
                                  "*.safetensors")
        return None
    return read_json_object(path, ConversionError)


def _ids(value) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _token_id(tok, token) -> Optional[int]:
    """tokenizer_config.json names tokens as strings or {"content": ...} dicts."""
    if isinstance(token, dict):
        token = token.get("content")
    return tok.token_to_id(token) if isinstance(token, str) else None


def hf_tokenizer_ids(folder: Path, hf_config: dict) -> dict:
    """bos/eos/pad/stop ids and add_bos for tokenizer.json, as transformers would use them:
    config.json and generation_config.json ids first, tokenizer_config.json token strings next;
    every eos id either file lists stops generation."""
    from tokenizers import Tokenizer as HFTokenizer

    from gptk_jax.tokenizers import post_processor_adds_bos

    json_path = folder / TOKENIZER_JSON
    try:
        tok = HFTokenizer.from_file(str(json_path))
    except Exception as e:
        raise ConversionError(f"{json_path}: not a valid HF tokenizers JSON ({e})") from None
    gen = _read_json(folder / GENERATION_CONFIG, required=False) or {}
    tcfg = _read_json(folder / TOKENIZER_CONFIG, required=False) or {}

    def pick(key: str, token_key: str) -> list[int]:
        found = _ids(hf_config.get(key)) + _ids(gen.get(key))
        by_name = _token_id(tok, tcfg.get(token_key))
        return found + ([by_name] if by_name is not None else [])

    eos, bos, pad = pick("eos_token_id", "eos_token"), pick("bos_token_id", "bos_token"), \
        pick("pad_token_id", "pad_token")
    if not eos:
        raise ConversionError(f"{folder}: no eos_token_id in {CONFIG_FILE} or "
                              f"{GENERATION_CONFIG} and no eos_token in {TOKENIZER_CONFIG}: "
                              "cannot tell when generation stops")
    bos_id = bos[0] if bos else eos[0]
    add_bos = tcfg.get("add_bos_token")
    if not isinstance(add_bos, bool):  # Llama 3: the post-processor template adds BOS
        add_bos = bool(bos) and post_processor_adds_bos(tok, bos_id)
    return {"bos_id": bos_id, "eos_id": eos[0], "pad_id": pad[0] if pad else eos[0],
            "stop_ids": sorted(set(eos)), "add_bos": add_bos}


def tokenizer_writer(folder: Path, hf_config: dict) -> tuple[Optional[Callable[[Path], None]],
                                                             str, Optional[int]]:
    """Validates the tokenizer now (before any weights are read); returns the function that
    writes it into the converted folder (None: the folder has no tokenizer), its kind and its
    vocabulary size."""
    from gptk_jax import tokenizers

    try:
        if (folder / TOKENIZER_JSON).is_file():
            tok = tokenizers.HFJsonTokenizer(
                folder / TOKENIZER_JSON, chat_template=tokenizers.read_hf_chat_template(folder),
                **hf_tokenizer_ids(folder, hf_config))
            return tok.save, tok.kind, tok.vocab_size
        if (folder / TOKENIZER_MODEL).is_file():
            path = folder / TOKENIZER_MODEL
            kind = tokenizers.detect_tokenizer_model_kind(path)
            if kind == tokenizers.KIND_LLAMA3:
                tok, write = tokenizers.Llama3Tokenizer(path), tokenizers.write_llama3_tokenizer
            else:
                tok, write = (tokenizers.SentencePieceTokenizer(path),
                              tokenizers.write_sentencepiece_tokenizer)
            tcfg = _read_json(folder / TOKENIZER_CONFIG, required=False) or {}
            options = {"chat_template": tokenizers.read_hf_chat_template(folder)}
            if isinstance(tcfg.get("add_bos_token"), bool):
                options["add_bos"] = tcfg["add_bos_token"]
            return (lambda out: write(path, out, **options)), kind, tok.vocab_size
    except tokenizers.TokenizerError as e:
        raise ConversionError(str(e)) from None
    return None, "none", None


# --- entry point --------------------------------------------------------------------------------

def read(input_path: Path, *, dtype: str = "float32", rope_scaling_factor: Optional[float] = None,
         scan_layers: bool = False, allow_small_vocab: bool = False) -> Converted:
    """Reads an HF Llama folder (see module docstring) into a `Converted`;
    `allow_small_vocab`: see convert.common.check_tokenizer_fits."""
    folder = Path(input_path)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a folder; --format hf expects the folder with "
                              f"{CONFIG_FILE} and *.safetensors")
    np_dtype = numpy_dtype(dtype)
    hf_config = _read_json(folder / CONFIG_FILE, required=True)
    model_type = hf_config.get("model_type", "llama")
    if model_type != "llama":
        raise ConversionError(f"{folder / CONFIG_FILE}: model_type is {model_type!r}; --format "
                              "hf converts only 'llama' (LlamaForCausalLM)")
    config = from_hf_config(hf_config, rope_scaling_factor=rope_scaling_factor,
                            source=str(folder / CONFIG_FILE), scan_layers=scan_layers,
                            param_dtype=dtype)
    write_tokenizer, tokenizer_kind, tokenizer_vocab = tokenizer_writer(folder, hf_config)
    files, tensors = find_weight_files(folder)
    names, ignored = check_tensors(tensors, config, folder)

    warnings = []
    if write_tokenizer is None:
        warnings.append(f"{folder} has no {TOKENIZER_JSON} or {TOKENIZER_MODEL}: the converted "
                        "folder has no tokenizer (load it with load_tokenizer=False)")
    else:
        tokenizer_file = folder / (TOKENIZER_JSON if (folder / TOKENIZER_JSON).is_file()
                                   else TOKENIZER_MODEL)
        embedding_file = tensors["model.embed_tokens.weight"][2]
        warnings += check_tokenizer_fits(
            tokenizer_vocab, config.vocab_size, tokenizer=str(tokenizer_file),
            embedding=f"model.embed_tokens.weight in {embedding_file} ({CONFIG_FILE} "
                      f"vocab_size {config.vocab_size})", allow_small_vocab=allow_small_vocab)
    if "lm_head.weight" in ignored:
        warnings.append("lm_head.weight ignored: config.json says tie_word_embeddings")

    params = convert_tensors(tensors, names, config, np_dtype)
    extra_files = [folder / n for n in (CONFIG_FILE, INDEX_FILE, TOKENIZER_JSON, TOKENIZER_MODEL,
                                        TOKENIZER_CONFIG, GENERATION_CONFIG)
                   if (folder / n).is_file()]
    provenance = {
        "format": "hf",
        "input": str(folder.absolute()),
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                  for p in extra_files + files},
        "shards": len(files),
        "source_dtypes": sorted({tensors[n][0] for n in names}),
        "dtype": dtype,
        "tie_embeddings": config.tie_embeddings,
        "rope_scaling": config.rope_scaling_source,
        "rope_layout": "half-split as stored (HF q/k need no permutation)",
        "tokenizer_kind": tokenizer_kind,
        "tokenizer_vocab_size": tokenizer_vocab,
        "allow_small_vocab": allow_small_vocab,
        "ignored_tensors": ignored,
        "warnings": warnings,
    }
    return Converted(config=config, params=params, write_tokenizer=write_tokenizer,
                     provenance=provenance)
