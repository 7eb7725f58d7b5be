"""`python -m convert`: a checkpoint in Meta, HF or GGUF layout -> a converted model folder.

    python -m convert --format meta --input ~/Llama3.2-1B --output out/llama3.2-1b \\
        [--dtype float32|bfloat16] [--rope-scaling-factor F] [--overwrite] [--allow-small-vocab]

The format reader (convert/meta.py, hf.py, gguf_format.py) returns a `Converted`; this file
prints the config and the RoPE scaling decision, then `gptk_jax.llama.checkpoint.save_converted` writes
the folder atomically after a shape check against the model's own `jax.eval_shape`. Any bad input
is one line on stderr and exit code 2; no output folder (nor hidden partial one) is left behind.
A tokenizer with more ids than the model's embedding has rows is such an error unless
--allow-small-vocab is given; the folder then records it (see gptk_jax/llama/checkpoint.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from convert.common import ALLOW_SMALL_VOCAB_FLAG, ConversionError, Converted
from gptk_jax.errors import CLI_ERRORS

FORMAT_MODULES = {"meta": "convert.meta", "hf": "convert.hf", "gguf": "convert.gguf_format"}
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=sorted(FORMAT_MODULES),
                   help="input layout: meta (params.json + consolidated.NN.pth), hf "
                        "(config.json + safetensors), gguf (one .gguf file)")
    p.add_argument("--input", required=True, type=Path, help="checkpoint folder or file")
    p.add_argument("--output", required=True, type=Path, help="converted model folder to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the written weights (default float32)")
    p.add_argument("--rope-scaling-factor", type=float, default=None, metavar="F",
                   help="override the Llama 3 RoPE scaling factor (0 = no scaling); default: "
                        "what the checkpoint says (Meta: 8 when use_scaled_rope)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it exists (only once the new one is complete)")
    p.add_argument(ALLOW_SMALL_VOCAB_FLAG, action="store_true",
                   help="convert even if the tokenizer has more ids than the embedding has rows "
                        "(tiny test models beside a real tokenizer); printed as a warning and "
                        "recorded in conversion.json, and ids past the embedding stay unusable")
    return p


def reader_for(fmt: str) -> Callable[..., Converted]:
    """The format module's `read`, imported only when asked for."""
    name = FORMAT_MODULES[fmt]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            raise ConversionError(f"--format {fmt}: reader module {name} is not available") \
                from None
        raise
    return module.read


def _missing_ancestors(path: Path) -> list[Path]:
    """Folders above `path` that do not exist yet, deepest first (save_converted creates them)."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _check_paths(input_path: Path, output: Path, overwrite: bool) -> None:
    from gptk_jax.llama.checkpoint import CheckpointError, check_output_folder

    if not input_path.exists():
        raise ConversionError(f"--input {input_path}: no such file or folder")
    check_output_folder(output, overwrite)   # before any tensor is read
    src, dst = input_path.resolve(), output.resolve()
    if src == dst or dst in src.parents or src in dst.parents:
        raise CheckpointError(f"--output {output} overlaps --input {input_path}; "
                              "write the converted model elsewhere")


def describe(converted: Converted) -> str:
    """The config and the RoPE scaling decision, for the terminal."""
    c = converted.config
    n_params = sum(int(getattr(leaf, "size", 0)) for leaf in _leaves(converted.params))
    rope = (f"factor {c.rope_scaling.factor:g} (low {c.rope_scaling.low_freq_factor:g}, high "
            f"{c.rope_scaling.high_freq_factor:g}, original context "
            f"{c.rope_scaling.original_max_position})" if c.rope_scaling else "off")
    lines = [
        f"config: vocab {c.vocab_size}, dim {c.dim}, layers {c.n_layers}, heads {c.n_heads}, "
        f"kv heads {c.n_kv_heads}, head dim {c.head_dim}, ffn {c.ffn_dim}, "
        f"norm eps {c.norm_eps:g}, rope theta {c.rope_theta:g}, "
        f"tied embeddings {c.tie_embeddings}, weights {c.param_dtype}",
        f"parameters: {n_params:,}",
        f"RoPE scaling: {rope}",
        f"  because: {c.rope_scaling_source}",
    ]
    return "\n".join(lines)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def convert(fmt: str, input_path: Path, output: Path, *, dtype: str = "float32",
            rope_scaling_factor: Optional[float] = None, overwrite: bool = False,
            allow_small_vocab: bool = False, log: Callable[[str], None] = print) -> Path:
    """Reads, reports and writes; raises ConversionError / CheckpointError / ConfigError."""
    from gptk_jax.llama.checkpoint import save_converted

    input_path, output = Path(input_path), Path(output).absolute()
    _check_paths(input_path, output, overwrite)
    created = _missing_ancestors(output)
    start = time.perf_counter()
    try:
        converted = reader_for(fmt)(input_path, dtype=dtype,
                                    rope_scaling_factor=rope_scaling_factor,
                                    allow_small_vocab=allow_small_vocab)
        read_s = time.perf_counter() - start
        log(describe(converted))
        log(f"read and converted in {read_s:.1f} s")
        for warning in converted.provenance.get("warnings", ()):
            log(f"warning: {warning}")
        provenance = dict(converted.provenance)
        provenance.setdefault("rope_scaling", converted.config.rope_scaling_source)
        provenance["command"] = {"format": fmt, "dtype": dtype,
                                 "rope_scaling_factor": rope_scaling_factor,
                                 "allow_small_vocab": allow_small_vocab}
        out = save_converted(output, converted.config, converted.params,
                             write_tokenizer=converted.write_tokenizer, provenance=provenance,
                             overwrite=overwrite, log=log)
    except BaseException:
        for folder in created:  # only the (now empty) folders this run created
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    log(f"wrote {out} in {time.perf_counter() - start - read_s:.1f} s")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert(args.format, args.input, args.output, dtype=args.dtype,
                rope_scaling_factor=args.rope_scaling_factor, overwrite=args.overwrite,
                allow_small_vocab=args.allow_small_vocab)
    except CLI_ERRORS as e:
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)  # always one line
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
