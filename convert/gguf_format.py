"""A llama-architecture GGUF file (llama.cpp) -> the canonical param tree (docs/design.md).

    INPUT.gguf   metadata (llama.* hyper-parameters, tokenizer.ggml.* byte-level BPE) + tensors
                 (F32, F16, BF16 or quantized: Q8_0, Q4_1, ... anything gguf.quants dequantizes)

Before `gguf.GGUFReader` sees the file, `scan_header` walks the header with bounds checks of its
own: magic, version, the key/value and tensor counts against the file size, general.architecture
(only 'llama' converts), and every tensor's type, shape and data range (inside the file, aligned,
not overlapping; sizes in Python ints, never int64). A truncated or foreign file thus fails with
one message naming the file and the tensor or key, never deep inside a numpy reshape.

Tensors are then dequantized one by one (`gguf.quants.dequantize`) into preallocated stacked
arrays. llama.cpp's converter stores q/k rows in Meta's interleaved-pair RoPE layout (it permutes
HF's half-split rows), so attn_q / attn_k are permuted back to half-split here. llama.cpp writes
Llama 3 RoPE scaling not as metadata but as a `rope_freqs.weight` tensor of per-frequency
divisors; it is matched against Llama 3 scaling to recover the factor.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from pathlib import Path
from typing import Any, Optional

import numpy as np

from convert.common import (ConversionError, Converted, TORCH_SHAPES, check_tokenizer_fits,
                            empty_layer_stack, numpy_dtype, set_layer, torch_to_kernel)
from gptk_jax.files import sha256_file
from gptk_jax.llama.config import (LLAMA3_ORIGINAL_CONTEXT, ConfigError, LlamaConfig, RopeScaling,
                             from_gguf_metadata)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
ROPE_FREQS = "rope_freqs.weight"

# GGUF metadata value types -> struct format (STRING = 8 and ARRAY = 9 are variable length)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# name inside `blk.{i}.` -> (canonical leaf path in params["layers"], kind)
LAYER_TABLE = {
    "attn_norm.weight": (("attention_norm", "scale"), "norm"),
    "attn_q.weight": (("attention", "wq", "kernel"), "q"),
    "attn_k.weight": (("attention", "wk", "kernel"), "k"),
    "attn_v.weight": (("attention", "wv", "kernel"), "v"),
    "attn_output.weight": (("attention", "wo", "kernel"), "o"),
    "ffn_norm.weight": (("ffn_norm", "scale"), "norm"),
    "ffn_gate.weight": (("feed_forward", "w1", "kernel"), "ffn_in"),
    "ffn_up.weight": (("feed_forward", "w3", "kernel"), "ffn_in"),
    "ffn_down.weight": (("feed_forward", "w2", "kernel"), "ffn_out"),
}
TOP_TABLE = {
    "token_embd.weight": (("tok_embeddings", "embedding"), "embedding"),
    "output_norm.weight": (("norm", "scale"), "norm"),
    "output.weight": (("output", "kernel"), "output"),
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


# tokenizer arrays: large, read by gptk_jax.tokenizers, not needed as config metadata
_SKIP_METADATA = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                  "tokenizer.ggml.token_type", "tokenizer.chat_template")


# --- header scan --------------------------------------------------------------------------------

class _Cursor:
    """Reads little-endian values from the mapped file; every read is bounds-checked."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ConversionError(f"{self.path}: file ends at byte {len(self.buf)} while reading "
                                  f"{what} ({n} bytes at {self.pos}): truncated or not GGUF")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, decode: bool = True) -> Optional[str]:
        raw = self.take(self.unpack("<Q", f"{what} length"), what)
        if not decode:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConversionError(f"{self.path}: {what} is not UTF-8 (at byte {self.pos})") \
                from None

    def value(self, vtype: int, what: str, keep: bool):
        """One metadata value (skipped, returning None, unless `keep`)."""
        if vtype in _SCALARS:
            v = self.unpack(_SCALARS[vtype], what)
            return v if keep else None
        if vtype == _STRING:
            return self.string(what, decode=keep)
        if vtype == _ARRAY:
            item_type = self.unpack("<I", f"{what} item type")
            count = self.unpack("<Q", f"{what} item count")
            if item_type in _SCALARS:  # fixed size: skip in one step
                size = struct.calcsize(_SCALARS[item_type])
                if count * size > len(self.buf) - self.pos:
                    raise ConversionError(f"{self.path}: {what} claims {count} items, more than "
                                          "the file holds: truncated or corrupt")
                self.take(count * size, what)
                return None
            if count > len(self.buf) - self.pos:  # every item is at least one byte
                raise ConversionError(f"{self.path}: {what} claims {count} items, more than the "
                                      "file holds: truncated or corrupt")
            for i in range(count):
                self.value(item_type, f"{what}[{i}]", keep=False)
            return None
        raise ConversionError(f"{self.path}: {what} has unknown GGUF value type {vtype}")


def scan_header(path: Path) -> dict:
    """Walks the GGUF header (see module docstring); returns version, architecture, the scalar
    metadata read on the way, and {tensor name: (ggml type, torch-order shape, begin, end)}."""
    size = path.stat().st_size
    if size < 24:
        raise ConversionError(f"{path}: {size} bytes, too short for a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        cur = _Cursor(mm, path)  # mmap slices are bytes copies: nothing outlives the map
        if cur.take(4, "magic") != GGUF_MAGIC:
            raise ConversionError(f"{path}: not a GGUF file (no 'GGUF' magic)")
        version = cur.unpack("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            raise ConversionError(f"{path}: GGUF version {version} is not supported "
                                  f"({SUPPORTED_VERSIONS}; big-endian files are not either)")
        n_tensors = cur.unpack("<Q", "tensor count")
        n_kv = cur.unpack("<Q", "metadata count")
        # every key/value takes >= 13 bytes, every tensor info >= 28
        if 13 * n_kv + 28 * n_tensors > size:
            raise ConversionError(f"{path}: header claims {n_kv} metadata entries and "
                                  f"{n_tensors} tensors, more than a {size}-byte file holds: "
                                  "truncated or corrupt")
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.unpack("<I", f"type of {key!r}")
            metadata[key] = cur.value(vtype, f"metadata {key!r}", keep=vtype != _ARRAY)
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor #{i} name")
            n_dims = cur.unpack("<I", f"tensor {name} rank")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ConversionError(f"{path}: tensor {name} has {n_dims} dimensions")
            dims = [cur.unpack("<Q", f"tensor {name} shape") for _ in range(n_dims)]
            raw_type = cur.unpack("<I", f"tensor {name} type")
            offset = cur.unpack("<Q", f"tensor {name} offset")
            infos.append((name, dims, raw_type, offset))
        header_end = cur.pos

    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ConversionError(f"{path}: general.architecture is {arch!r}; --format gguf converts "
                              "only 'llama' models (Llama 2/3, SmolLM2, ...)")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ConversionError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_start = -(-header_end // alignment) * alignment

    tensors = _tensor_ranges(path, infos, data_start, alignment, size)
    return {"version": version, "architecture": arch, "metadata": metadata,
            "tensors": tensors, "data_start": data_start}


def _tensor_ranges(path: Path, infos: list, data_start: int, alignment: int,
                   size: int) -> dict:
    """{name: (ggml type, torch-order shape, begin, end)}, every range checked against the
    `size`-byte file (aligned, inside it, not overlapping) with Python ints: a byte count is
    never computed in int64, where [2**32, 2**32] wrapped to 0 and passed, to fail later
    inside gguf.GGUFReader's reshape."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors, spans = {}, []
    for name, dims, raw_type, offset in infos:
        where = f"{path}: tensor {name}"
        if name in tensors:
            raise ConversionError(f"{where} appears twice")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ConversionError(f"{where} has unknown ggml type {raw_type}") from None
        if dims[0] % block:
            raise ConversionError(f"{where}: innermost size {dims[0]} is not a multiple of "
                                  f"{qtype.name}'s block of {block}")
        n_bytes = math.prod(dims) // block * type_size
        begin = data_start + offset
        if offset % alignment:
            raise ConversionError(f"{where}: data offset {offset} is not {alignment}-aligned")
        if begin + n_bytes > size:
            raise ConversionError(f"{where}: shape {dims} of {qtype.name} needs {n_bytes} bytes "
                                  f"at [{begin}, {begin + n_bytes}), which runs past the end of "
                                  f"the file ({size} bytes): the file is truncated or its header "
                                  "is corrupt")
        tensors[name] = (qtype, tuple(reversed(dims)), begin, begin + n_bytes)
        spans.append((begin, begin + n_bytes, name))
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ConversionError(f"{path}: tensors {name_a} and {name_b} overlap (corrupt "
                                  "tensor offsets)")
    return tensors


# --- metadata -----------------------------------------------------------------------------------

def metadata_values(reader) -> dict:
    """GGUF fields as plain Python values (the tokenizer's large arrays left out)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _SKIP_METADATA:
            continue
        out[key] = field.contents()
    return out


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def rope_from_freqs(factors: np.ndarray, config: LlamaConfig, original_context: int,
                    path: Path) -> Optional[RopeScaling]:
    """llama.cpp's `rope_freqs.weight` (per-frequency divisors, [head_dim/2]) as Llama 3 scaling:
    the factor is the largest divisor; every divisor must then be what Llama 3 scaling with
    low/high frequency factors 1/4 gives (llama.cpp's convert_hf_to_gguf.py computes them so)."""
    from gptk_jax.llama.rope import inverse_frequencies

    factors = np.asarray(factors, np.float64).reshape(-1)
    half = config.head_dim // 2
    if factors.shape != (half,):
        raise ConversionError(f"{path}: tensor {ROPE_FREQS} has {factors.size} values, expected "
                              f"head_dim/2 = {half}")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    scaling = RopeScaling(factor=float(factors.max()), original_max_position=original_context)
    plain = inverse_frequencies(config.head_dim, config.rope_theta)
    scaled = inverse_frequencies(config.head_dim, config.rope_theta, scaling)
    implied = plain.astype(np.float64) / scaled
    if not np.allclose(factors, implied, rtol=1e-4, atol=0):
        raise ConversionError(
            f"{path}: tensor {ROPE_FREQS} {np.round(factors, 4).tolist()} is not Llama 3 RoPE "
            f"scaling (factor {scaling.factor:g}, low/high frequency factors 1/4, original "
            f"context {original_context}); this kind of RoPE scaling is not supported")
    return scaling


def build_config(path: Path, meta: dict, tensors: dict, rope_freqs: Optional[np.ndarray],
                 rope_scaling_factor: Optional[float], scan_layers: bool,
                 dtype: str) -> tuple[LlamaConfig, list[str]]:
    """LlamaConfig from the metadata, with vocab and tying read off the tensors."""
    warnings = []
    p = "llama."
    if "token_embd.weight" not in tensors:
        raise ConversionError(f"{path}: missing tensor token_embd.weight")
    embed_rows = tensors["token_embd.weight"][1][0]
    vocab = meta.get(p + "vocab_size")
    if vocab is not None and int(vocab) != embed_rows:
        raise ConversionError(f"{path}: llama.vocab_size is {vocab} but token_embd.weight has "
                              f"{embed_rows} rows")
    scaling_type = meta.get(p + "rope.scaling.type")
    if scaling_type not in (None, "none", "llama3"):
        raise ConversionError(f"{path}: llama.rope.scaling.type {scaling_type!r} is not "
                              "supported (only Llama 3 scaling)")
    overrides: dict = dict(scan_layers=scan_layers, param_dtype=dtype)
    key_len = meta.get(p + "attention.key_length")
    value_len = meta.get(p + "attention.value_length")
    if key_len is not None:
        if value_len is not None and value_len != key_len:
            raise ConversionError(f"{path}: attention.key_length {key_len} != value_length "
                                  f"{value_len} is not a Llama model")
        overrides["head_dim"] = int(key_len)
    meta = dict(meta, **{p + "vocab_size": embed_rows})
    try:
        config = from_gguf_metadata(meta, tie_embeddings="output.weight" not in tensors,
                                    rope_scaling_factor=rope_scaling_factor, source=str(path),
                                    **overrides)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    rope_dims = meta.get(p + "rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != config.head_dim:
        raise ConversionError(f"{path}: llama.rope.dimension_count {rope_dims} != head_dim "
                              f"{config.head_dim} (partial rotary embeddings are not Llama)")
    if rope_freqs is not None:
        if rope_scaling_factor is not None:
            warnings.append(f"{ROPE_FREQS} ignored: --rope-scaling-factor {rope_scaling_factor} "
                            "given")
        else:
            original = int(meta.get(p + "rope.scaling.original_context_length")
                           or LLAMA3_ORIGINAL_CONTEXT)
            scaling = rope_from_freqs(rope_freqs, config, original, path)
            why = (f"factor {scaling.factor:g} recovered from {path.name}'s {ROPE_FREQS} "
                   "(llama.cpp stores Llama 3 scaling as per-frequency divisors)" if scaling
                   else f"{path.name}'s {ROPE_FREQS} is all ones (no scaling)")
            config = config.replace(rope_scaling=scaling, rope_scaling_source=why)
    return config, warnings


# --- names and tensors --------------------------------------------------------------------------

def expected_names(n_layers: int, tied: bool) -> list[str]:
    names = ["token_embd.weight"]
    names += [f"blk.{i}.{leaf}" for i in range(n_layers) for leaf in LAYER_TABLE]
    names += ["output_norm.weight"] + ([] if tied else ["output.weight"])
    return names


def _kind(name: str) -> tuple[tuple, str, Optional[int]]:
    if name in TOP_TABLE:
        return (*TOP_TABLE[name], None)
    layer, leaf = _LAYER_NAME.fullmatch(name).groups()
    return (*LAYER_TABLE[leaf], int(layer))


def check_tensors(tensors: dict, config: LlamaConfig, path: Path) -> list[str]:
    """Names and shapes against the metadata; returns the names to convert, in order."""
    names = expected_names(config.n_layers, config.tie_embeddings)
    present = set(tensors) - {ROPE_FREQS}
    missing = [n for n in names if n not in present]
    extra = sorted(present - set(names))
    if missing or extra:
        parts = ([f"missing tensors {missing[:8]}"] if missing else []) + \
                ([f"unexpected tensors {extra[:8]}"] if extra else [])
        raise ConversionError(f"{path}: " + "; ".join(parts) +
                              f" (llama.block_count={config.n_layers})")
    problems = []
    for name in names:
        qtype, shape = tensors[name][:2]
        want = TORCH_SHAPES[_kind(name)[1]](config)
        if shape != want:
            problems.append(f"tensor {name} has shape {shape}, expected {want}")
    if problems:
        raise ConversionError(f"{path}: tensors do not match the metadata: "
                              + "; ".join(problems[:8]))
    return names


def dequantized(tensor, path: Path) -> np.ndarray:
    """One ReaderTensor as float32 in torch order."""
    from gguf.quants import dequantize

    try:
        return np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
    except (NotImplementedError, ValueError) as e:
        raise ConversionError(f"{path}: tensor {tensor.name} of type {tensor.tensor_type.name} "
                              f"cannot be dequantized ({e})") from None


def convert_tensors(reader, names: list[str], config: LlamaConfig, dtype, path: Path) -> dict:
    from tqdm import tqdm

    by_name = {t.name: t for t in reader.tensors}
    layers = empty_layer_stack(config, dtype)
    params: dict = {"layers": layers}
    for name in tqdm(names, desc="dequantizing", unit="tensor", disable=None, leave=False):
        leaf_path, kind, layer = _kind(name)
        value = torch_to_kernel(kind, dequantized(by_name[name], path), config,
                                interleaved_qk=True).astype(dtype)
        if layer is None:
            params.setdefault(leaf_path[0], {})[leaf_path[1]] = value
        else:
            set_layer(layers, leaf_path, layer, value, name=name)
    return params


# --- tokenizer ----------------------------------------------------------------------------------

def tokenizer_writer(reader, path: Path) -> tuple[Optional[Any], Optional[int], Optional[str]]:
    """Checks now that the GGUF tokenizer can be built; returns (writer or None, its vocabulary
    size, the reason it cannot be built)."""
    from gptk_jax import tokenizers

    try:
        meta = tokenizers.read_gguf_tokenizer_metadata(reader)
        vocab = tokenizers.build_gguf_bpe_tokenizer(meta).get_vocab_size(with_added_tokens=True)
        tokenizers.gguf_tokenizer_ids(meta)
    except tokenizers.TokenizerError as e:
        return None, None, str(e)
    return (lambda folder: tokenizers.write_gguf_tokenizer(reader, folder)), vocab, None


# --- entry point --------------------------------------------------------------------------------

def read(input_path: Path, *, dtype: str = "float32", rope_scaling_factor: Optional[float] = None,
         scan_layers: bool = False, allow_small_vocab: bool = False) -> Converted:
    """Reads a llama GGUF file (see module docstring) into a `Converted`;
    `allow_small_vocab`: see convert.common.check_tokenizer_fits."""
    from gguf import GGUFReader

    path = Path(input_path)
    if not path.is_file():
        raise ConversionError(f"{path}: not a file; --format gguf expects one .gguf file")
    np_dtype = numpy_dtype(dtype)
    scan = scan_header(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the scan passed, so this is a gguf-py limitation or a bug
        raise ConversionError(f"{path}: gguf.GGUFReader cannot read the file "
                              f"({type(e).__name__}: {e})") from None
    if len(reader.tensors) != len(scan["tensors"]):
        raise ConversionError(f"{path}: GGUFReader found {len(reader.tensors)} tensors, the "
                              f"header lists {len(scan['tensors'])}")
    meta = {k: _plain(v) for k, v in metadata_values(reader).items()}
    tensors = scan["tensors"]
    rope_freqs = None
    if ROPE_FREQS in tensors:
        rope_freqs = dequantized(next(t for t in reader.tensors if t.name == ROPE_FREQS), path)
    config, warnings = build_config(path, meta, tensors, rope_freqs, rope_scaling_factor,
                                    scan_layers, dtype)
    names = check_tensors(tensors, config, path)

    write_tokenizer, tokenizer_vocab, tokenizer_problem = tokenizer_writer(reader, path)
    if write_tokenizer is None:
        warnings.append(f"no tokenizer written: {tokenizer_problem}")
    else:
        warnings += check_tokenizer_fits(
            tokenizer_vocab, config.vocab_size, tokenizer=f"{path} tokenizer.ggml.tokens",
            embedding=f"{path} tensor token_embd.weight", allow_small_vocab=allow_small_vocab)

    params = convert_tensors(reader, names, config, np_dtype, path)
    provenance = {
        "format": "gguf",
        "input": str(path.absolute()),
        "files": {path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}},
        "gguf_version": scan["version"],
        "general.name": meta.get("general.name"),
        "tensor_types": sorted({tensors[n][0].name for n in names}),
        "dtype": dtype,
        "tie_embeddings": config.tie_embeddings,
        "rope_scaling": config.rope_scaling_source,
        "rope_layout": "attn_q/attn_k rows permuted from llama.cpp's interleaved pairs to "
                       "half-split",
        "tokenizer_kind": "hf_json" if write_tokenizer else "none",
        "tokenizer_vocab_size": tokenizer_vocab,
        "allow_small_vocab": allow_small_vocab,
        "warnings": warnings,
    }
    return Converted(config=config, params=params, write_tokenizer=write_tokenizer,
                     provenance=provenance)
