"""Shared by the converter tests: `python -m convert` in-process, and what a refused conversion
must look like (exit code 2, one `error: ` line on stderr, nothing left that looks like a model).
"""

from pathlib import Path

import numpy as np

from convert import cli

# Tiny random Meta checkpoints (vocab 256) sit beside the real Llama 3 tokenizer (128,256 ids).
ALLOW_SMALL_VOCAB = "--allow-small-vocab"


def run_convert(fmt: str, src, out, *extra) -> int:
    return cli.main(["--format", fmt, "--input", str(src), "--output", str(out),
                     *map(str, extra)])


def hidden_siblings(out: Path) -> list[str]:
    """`.OUT.partial-PID` / `.OUT.old-PID` folders beside `out` (atomic_folder's)."""
    if not out.parent.is_dir():
        return []
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    leftovers = hidden_siblings(out)
    assert not leftovers, f"hidden partial folders left behind: {leftovers}"


def assert_one_error_line(stderr: str, *needles) -> str:
    """stderr is exactly one line, `error: ...`, holding every needle; returns it stripped."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr, stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def expect_error(capsys, fmt: str, src, out: Path, *needles, extra=()) -> str:
    """The conversion fails with exit code 2 and one error line, leaving nothing behind."""
    assert run_convert(fmt, src, out, *extra) == 2
    err = assert_one_error_line(capsys.readouterr().err, *needles)
    assert_nothing_written(out)
    return err


def params_leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from params_leaves(tree[k], f"{prefix}/{k}")
    else:
        yield prefix, np.asarray(tree)


# --- Meta checkpoints ---------------------------------------------------------------------------

META_BASE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                 ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
META_BASE_SEED = 7


def write_meta_base(folder: Path) -> Path:
    """A valid tiny Meta checkpoint (META_BASE, seed META_BASE_SEED; real Llama 3 tokenizer)."""
    import _meta_reference as ref

    model = ref.build_reference(META_BASE, seed=META_BASE_SEED)
    return ref.write_meta_checkpoint(folder, model, META_BASE)


def convert_meta(src, out, *extra, small_vocab: bool = True) -> int:
    """Our CLI on a Meta folder. `small_vocab`: its embedding is smaller than the tokenizer
    (META_BASE's 256 rows beside Llama 3's 128,256 ids), so --allow-small-vocab is passed."""
    return run_convert("meta", src, out, *((ALLOW_SMALL_VOCAB,) if small_vocab else ()), *extra)
