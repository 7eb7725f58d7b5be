"""`python -m convert --format meta` against Meta's own reference model (llama-models 0.3.0).

Meta's `Transformer` (fairscale layers, interleaved-pair RoPE, its own KV cache) is built with
tiny random float32 weights, saved as Meta saves it (params.json + consolidated.NN.pth +
tokenizer.model), converted by our CLI and loaded with `load_converted`; logits and greedy
continuations must match Meta's. Also: model-parallel shards, tied embeddings, RoPE scaling on,
off and overridden, bfloat16, and every bad-input error the converter promises.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import _meta_reference as ref
from conftest import ROOT, read_lines
from convert import cli
from gptk_jax.llama.checkpoint import load_converted
from gptk_jax.llama.kv_cache import KVCache
from gptk_jax.llama.model import Llama
from gptk_jax.llama.rope import inverse_frequencies

LOGITS_ATOL = 1e-4

BASE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
            ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)

# (params.json changes, tied, scan_layers): every kv-head count, tied / untied, RoPE scaling on /
# off and scan on / off each appear at least once.
CASES = {
    "kv1_scaled": (dict(n_kv_heads=1), False, False),
    "kv2_tied_unscaled_scan": (dict(n_kv_heads=2, use_scaled_rope=False), True, True),
    "kv4_tied_scaled": (dict(n_kv_heads=4), True, False),
    "kv2_unscaled": (dict(n_kv_heads=2, use_scaled_rope=False), False, False),
    "kv4_scaled_scan": (dict(n_kv_heads=4), False, True),
}


# --- helpers ------------------------------------------------------------------------------------

def run_cli(*args) -> int:
    return cli.main([str(a) for a in args])


def convert_meta(src: Path, out: Path, *extra) -> int:
    return run_cli("--format", "meta", "--input", src, "--output", out, *extra)


def our_logits(model, tokens) -> np.ndarray:
    tokens = np.asarray(tokens, np.int32)
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    out = Llama(model.config).apply({"params": model.params}, jnp.asarray(tokens),
                                    jnp.asarray(positions))
    return np.asarray(out.logits)


def our_greedy(model, prompt, steps: int) -> list[list[int]]:
    """Prefill the prompt into the explicit KV cache, then one token per call."""
    cfg = model.config
    prompt = np.asarray(prompt, np.int32)
    b, t = prompt.shape
    jitted = jax.jit(lambda params, tokens, positions, cache: Llama(cfg).apply(
        {"params": params}, tokens, positions, cache))
    apply = lambda tokens, positions, cache: jitted(model.params, jnp.asarray(tokens),
                                                    jnp.asarray(positions), cache)
    out = apply(prompt, np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                KVCache.init(cfg, b, t + steps))
    tokens = []
    for step in range(steps):
        nxt = np.asarray(out.logits[:, -1]).argmax(-1).astype(np.int32)
        tokens.append(nxt)
        out = apply(nxt[:, None], np.full((b, 1), t + step, np.int32), out.cache)
    return np.stack(tokens, 1).tolist()


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    if not out.parent.exists():
        return
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, f"hidden partial folders left behind: {leftovers}"


def expect_error(capsys, src: Path, out: Path, *needles, extra=()) -> str:
    assert convert_meta(src, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert_nothing_written(out)
    return err


def edit_state(src: Path, edit) -> None:
    path = src / "consolidated.00.pth"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def params_leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from params_leaves(tree[k], f"{prefix}/{k}")
    else:
        yield prefix, np.asarray(tree)


def case_params(changes: dict) -> dict:
    return {**BASE, **changes}


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case name -> (Meta reference model, our loaded conversion); built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            changes, tied, scan = CASES[name]
            params = case_params(changes)
            model = ref.build_reference(params, seed=len(cache), tied=tied)
            root = tmp_path_factory.mktemp(name)
            ref.write_meta_checkpoint(root / "meta", model, params, tied=tied)
            assert convert_meta(root / "meta", root / "out") == 0
            cache[name] = (model, load_converted(root / "out", scan_layers=scan))
        return cache[name]
    return get


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    """A valid tiny Meta checkpoint folder; error tests copy and damage it."""
    root = tmp_path_factory.mktemp("base")
    model = ref.build_reference(BASE, seed=7)
    return ref.write_meta_checkpoint(root / "meta", model, BASE)


@pytest.fixture
def damaged(base_checkpoint, tmp_path) -> Path:
    src = tmp_path / "meta"
    shutil.copytree(base_checkpoint, src)
    return src


# --- parity with Meta's reference --------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_meta_reference(converted, name):
    model, ours = converted(name)
    changes, tied, scan = CASES[name]
    assert ours.config.n_kv_heads == case_params(changes)["n_kv_heads"]
    assert ours.config.tie_embeddings == tied and ours.config.scan_layers == scan
    assert (ours.config.rope_scaling is not None) == case_params(changes)["use_scaled_rope"]
    tokens = np.random.RandomState(0).randint(0, BASE["vocab_size"], (2, 17))
    want = ref.reference_logits(model, tokens).numpy()
    got = our_logits(ours, tokens)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGITS_ATOL)
    assert want.std() > 0.5  # logits far from uniform: the comparison has something to see


@pytest.mark.parametrize("name", ["kv1_scaled", "kv2_unscaled"])
def test_long_sequence_logits_match_meta_reference(converted, name):
    """Positions up to 299: the low frequencies Llama 3 scaling changes rotate far enough to
    matter (at positions < 20 scaling on/off moves the logits by less than the tolerance)."""
    model, ours = converted(name)
    tokens = np.random.RandomState(1).randint(0, BASE["vocab_size"], (1, 300))
    np.testing.assert_allclose(our_logits(ours, tokens), ref.reference_logits(model, tokens),
                               rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("name", ["kv1_scaled", "kv2_tied_unscaled_scan", "kv4_scaled_scan"])
def test_greedy_continuation_matches_meta_reference(converted, name):
    model, ours = converted(name)
    prompt = np.random.RandomState(2).randint(0, BASE["vocab_size"], (2, 7))
    want = ref.reference_greedy(model, prompt, 10)
    assert our_greedy(ours, prompt, 10) == want
    assert len(set(want[0] + want[1])) > 4  # not a degenerate repeat of the last prompt token


def test_real_sentence_with_full_vocabulary(tmp_path, wmt_dir):
    """The first newstest2014 German sentence through the converted Llama 3 tokenizer, on a
    model with the real 128256-entry vocabulary (tied)."""
    params = dict(BASE, dim=32, n_heads=2, n_kv_heads=1, vocab_size=128256)
    model = ref.build_reference(params, seed=3, tied=True, max_batch_size=1)
    ref.write_meta_checkpoint(tmp_path / "meta", model, params, tied=True)
    assert convert_meta(tmp_path / "meta", tmp_path / "out") == 0
    ours = load_converted(tmp_path / "out")
    sentence = read_lines(wmt_dir / "newstest2014.de")[0]
    ids = ours.tokenizer.encode(sentence, bos=True)
    assert ids[0] == 128000 and len(ids) > 10 and ours.tokenizer.decode(ids[1:]) == sentence
    tokens = np.asarray([ids])
    np.testing.assert_allclose(our_logits(ours, tokens), ref.reference_logits(model, tokens),
                               rtol=0, atol=LOGITS_ATOL)
    assert our_greedy(ours, tokens, 6) == ref.reference_greedy(model, tokens, 6)


# --- the comparisons above can fail ----------------------------------------------------------------

def test_skipping_the_rope_permutation_breaks_parity(base_checkpoint, tmp_path, monkeypatch):
    """Without the interleaved -> half-split permutation the logits are far off: the parity
    tests do see the RoPE layout."""
    import convert.common
    monkeypatch.setattr(convert.common, "interleaved_to_half_split", lambda w, n, h: w)
    assert convert_meta(base_checkpoint, tmp_path / "out") == 0
    ours = load_converted(tmp_path / "out", load_tokenizer=False)
    model = ref.build_reference(BASE, seed=7)  # the weights base_checkpoint was written from
    tokens = np.random.RandomState(0).randint(0, BASE["vocab_size"], (2, 17))
    assert np.abs(our_logits(ours, tokens) - ref.reference_logits(model, tokens).numpy()).max() > 1e-2


def test_rope_scaling_off_on_a_scaled_checkpoint_breaks_long_parity(converted, tmp_path):
    """`--rope-scaling-factor 0` on a use_scaled_rope checkpoint: the long-sequence comparison
    sees the difference, so it does test the scaling."""
    model, _ = converted("kv1_scaled")
    params = case_params(CASES["kv1_scaled"][0])
    ref.write_meta_checkpoint(tmp_path / "meta", model, params)
    assert convert_meta(tmp_path / "meta", tmp_path / "out", "--rope-scaling-factor", 0) == 0
    ours = load_converted(tmp_path / "out", load_tokenizer=False)
    assert ours.config.rope_scaling is None
    tokens = np.random.RandomState(1).randint(0, BASE["vocab_size"], (1, 300))
    diff = np.abs(our_logits(ours, tokens) - ref.reference_logits(model, tokens).numpy()).max()
    assert diff > 1e-3


# --- RoPE scaling decisions ---------------------------------------------------------------------

def test_rope_scaling_factor_32_gives_hf_llama3_frequencies(base_checkpoint, tmp_path, capsys):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert convert_meta(base_checkpoint, tmp_path / "out", "--rope-scaling-factor", 32) == 0
    printed = capsys.readouterr().out
    assert "RoPE scaling: factor 32" in printed and "--rope-scaling-factor" in printed
    cfg = load_converted(tmp_path / "out", load_tokenizer=False).config
    assert cfg.rope_scaling.factor == 32.0
    assert "--rope-scaling-factor" in cfg.rope_scaling_source
    hf = HFLlamaConfig(hidden_size=BASE["dim"], num_attention_heads=BASE["n_heads"],
                       rope_theta=BASE["rope_theta"], max_position_embeddings=131072,
                       rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})
    hf_freqs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, None)
    ours = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(ours, hf_freqs.numpy(), rtol=1e-6, atol=0)
    # ... and they are not Meta's factor-8 frequencies
    meta_8 = ref.meta_model_module().apply_scaling(
        1.0 / (BASE["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))).numpy()
    assert np.abs(ours / meta_8 - 1).max() > 0.5


def test_default_rope_scaling_is_metas_factor_8_and_says_why(capsys, base_checkpoint, tmp_path):
    assert convert_meta(base_checkpoint, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "RoPE scaling: factor 8" in printed and "use_scaled_rope" in printed
    cfg = load_converted(tmp_path / "out", load_tokenizer=False).config
    meta_freqs = ref.meta_model_module().apply_scaling(
        1.0 / (BASE["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))).numpy()
    np.testing.assert_allclose(inverse_frequencies(cfg.head_dim, cfg.rope_theta,
                                                   cfg.rope_scaling), meta_freqs, rtol=1e-6)
    provenance = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert provenance["format"] == "meta" and "use_scaled_rope" in provenance["rope_scaling"]
    assert set(provenance["files"]) == {"params.json", "tokenizer.model", "consolidated.00.pth"}


# --- model-parallel shards ----------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [2, 4])
def test_shard_cutting_matches_fairscale_layers(world_size, monkeypatch):
    """The test's shard cutter gives rank r exactly what fairscale's own layers hold at rank r
    (their `_initialize_affine_weight` / `VocabUtility`, run with a patched world size)."""
    import fairscale.nn.model_parallel.layers as fs_layers
    master = {"column": torch.randn(16, 12), "row": torch.randn(12, 16),
              "vocab": torch.randn(32, 12)}
    dims = {"column": 0, "row": 1, "vocab": 0}
    cut = ref.shard_state_dict(master, dims, world_size)
    for rank in range(world_size):
        monkeypatch.setattr(fs_layers, "get_model_parallel_world_size", lambda: world_size)
        monkeypatch.setattr(fs_layers, "get_model_parallel_rank", lambda: rank)
        layers = {
            "column": fs_layers.ColumnParallelLinear(
                12, 16, bias=False, init_method=lambda w: w.copy_(master["column"])),
            "row": fs_layers.RowParallelLinear(
                16, 12, bias=False, init_method=lambda w: w.copy_(master["row"])),
            "vocab": fs_layers.VocabParallelEmbedding(
                32, 12, init_method=lambda w: w.copy_(master["vocab"])),
        }
        for key, layer in layers.items():
            assert torch.equal(layer.weight.detach(), cut[rank][key]), (key, rank)


SHARD_PARAMS = dict(BASE, n_heads=8, n_kv_heads=4)


@pytest.mark.parametrize("shards,tied", [(2, False), (4, True)])
def test_sharded_checkpoint_converts_bit_for_bit(tmp_path, shards, tied):
    shard_model = ref.build_reference(SHARD_PARAMS, seed=11, tied=tied)
    single = tmp_path / "single"
    ref.write_meta_checkpoint(single, shard_model, SHARD_PARAMS, tied=tied)
    # 4 shards: vocab_size -1 in params.json, read from the (sharded) embedding rows instead
    params = dict(SHARD_PARAMS, vocab_size=-1) if shards == 4 else SHARD_PARAMS
    split = ref.write_meta_checkpoint(tmp_path / "split", shard_model, params, tied=tied,
                                      shards=shards)
    assert sorted(p.name for p in split.glob("*.pth")) == \
        [f"consolidated.{i:02d}.pth" for i in range(shards)]
    wq = torch.load(split / "consolidated.01.pth", weights_only=True)["layers.0.attention.wq.weight"]
    assert wq.shape[0] == SHARD_PARAMS["dim"] // shards
    assert convert_meta(single, tmp_path / "out1") == 0
    assert convert_meta(split, tmp_path / "outN") == 0
    a = load_converted(tmp_path / "out1", load_tokenizer=False)
    b = load_converted(tmp_path / "outN", load_tokenizer=False)
    assert b.config.vocab_size == SHARD_PARAMS["vocab_size"]
    assert b.config.tie_embeddings == tied
    leaves_a, leaves_b = dict(params_leaves(a.params)), dict(params_leaves(b.params))
    assert leaves_a.keys() == leaves_b.keys()
    for name in leaves_a:
        assert np.array_equal(leaves_a[name], leaves_b[name]), name
    tokens = np.random.RandomState(4).randint(0, 256, (1, 9))
    np.testing.assert_allclose(our_logits(b, tokens), ref.reference_logits(shard_model, tokens),
                               rtol=0, atol=LOGITS_ATOL)


def test_replicated_norm_that_differs_between_shards_is_refused(tmp_path, capsys):
    shard_model = ref.build_reference(SHARD_PARAMS, seed=11)
    split = ref.write_meta_checkpoint(tmp_path / "split", shard_model, SHARD_PARAMS, shards=2)
    state = torch.load(split / "consolidated.01.pth", weights_only=True)
    state["layers.1.ffn_norm.weight"] = state["layers.1.ffn_norm.weight"] + 1
    torch.save(state, split / "consolidated.01.pth")
    expect_error(capsys, split, tmp_path / "out", str(split / "consolidated.01.pth"),
                 "replicated tensor layers.1.ffn_norm.weight differs")


# --- dtype --------------------------------------------------------------------------------------

def test_bfloat16_is_float32_rounded_to_nearest_even(base_checkpoint, tmp_path):
    assert convert_meta(base_checkpoint, tmp_path / "f32") == 0
    assert convert_meta(base_checkpoint, tmp_path / "bf16", "--dtype", "bfloat16") == 0
    f32 = dict(params_leaves(load_converted(tmp_path / "f32", load_tokenizer=False).params))
    bf16_model = load_converted(tmp_path / "bf16", load_tokenizer=False)
    assert bf16_model.config.param_dtype == "bfloat16"
    bf16 = dict(params_leaves(bf16_model.params))
    for name, value in f32.items():
        assert bf16[name].dtype == ml_dtypes.bfloat16, name
        assert np.array_equal(bf16[name].view(np.uint16),
                              value.astype(ml_dtypes.bfloat16).view(np.uint16)), name


# --- bad inputs: exit code 2, one line naming file and tensor, nothing written -----------------

def test_missing_params_json(damaged, tmp_path, capsys):
    (damaged / "params.json").unlink()
    expect_error(capsys, damaged, tmp_path / "out", str(damaged / "params.json"), "not found")


def test_missing_and_extra_tensors_are_listed(damaged, tmp_path, capsys):
    def edit(state):
        del state["layers.1.attention.wk.weight"]
        del state["norm.weight"]
        state["layers.0.attention.wq.bias"] = torch.zeros(64)
    edit_state(damaged, edit)
    expect_error(capsys, damaged, tmp_path / "out", "consolidated.00.pth",
                 "'layers.1.attention.wk.weight'", "'norm.weight'",
                 "unexpected tensors ['layers.0.attention.wq.bias']")


def test_layer_beyond_n_layers_is_an_extra_tensor(damaged, tmp_path, capsys):
    edit_state(damaged, lambda s: s.update({"layers.2.ffn_norm.weight": torch.ones(64)}))
    expect_error(capsys, damaged, tmp_path / "out", "layers.2.ffn_norm.weight", "n_layers=2")


def test_wrong_shape_names_tensor_and_both_shapes(damaged, tmp_path, capsys):
    edit_state(damaged, lambda s: s.update({"layers.1.feed_forward.w2.weight": torch.zeros(64, 200)}))
    expect_error(capsys, damaged, tmp_path / "out", "consolidated.00.pth",
                 "layers.1.feed_forward.w2.weight", "(64, 200)", "(64, 224)")


def test_kv_heads_that_do_not_divide_heads(damaged, tmp_path, capsys):
    params = json.loads((damaged / "params.json").read_text())
    (damaged / "params.json").write_text(json.dumps(dict(params, n_kv_heads=3)))
    expect_error(capsys, damaged, tmp_path / "out", "params.json",
                 "n_kv_heads 3 does not divide n_heads 4")


def test_truncated_pth_names_the_file(damaged, tmp_path, capsys):
    path = damaged / "consolidated.00.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(capsys, damaged, tmp_path / "out", str(path), "truncated")


class _CreatesFile:
    """Unpickling this calls open(path, 'w'): a pickle that runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(damaged, tmp_path, capsys):
    # the payload is real: torch's full unpickler does create the file
    probe = tmp_path / "probe_created"
    torch.save({"x": _CreatesFile(probe)}, tmp_path / "probe.pth")
    torch.load(tmp_path / "probe.pth", weights_only=False)
    assert probe.exists()

    marker = tmp_path / "pwned"
    state = torch.load(damaged / "consolidated.00.pth", weights_only=True)
    state["tok_embeddings.weight"] = _CreatesFile(marker)
    torch.save(state, damaged / "consolidated.00.pth")
    expect_error(capsys, damaged, tmp_path / "out", str(damaged / "consolidated.00.pth"),
                 "refused by torch's weights-only loader")
    assert not marker.exists()


def test_existing_output_is_refused_unless_overwrite(base_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert_meta(base_checkpoint, out) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a converted model: a folder holding anything else is kept
    assert convert_meta(base_checkpoint, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert f"{out} is not one: refusing to delete it" in err and err.count("\n") == 1, err
    assert (out / "keep.txt").read_text() == "mine"
    converted_out = tmp_path / "converted"
    assert convert_meta(base_checkpoint, converted_out) == 0
    (converted_out / "params" / "stale.txt").write_text("from the earlier conversion")
    assert convert_meta(base_checkpoint, converted_out, "--overwrite") == 0
    assert not (converted_out / "params" / "stale.txt").exists()
    assert (converted_out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_while_writing_leaves_nothing(base_checkpoint, tmp_path, capsys, monkeypatch):
    """A failure after the weights are read (here: the tokenizer copy) removes the partial
    folder and the parent folders this run created."""
    import convert.meta

    def failing_writer(path):
        def write(folder):
            raise OSError(f"{folder}: No space left on device")
        return write, "llama3_tiktoken", 128256
    monkeypatch.setattr(convert.meta, "tokenizer_writer", failing_writer)
    out = tmp_path / "new" / "deeper" / "out"
    expect_error(capsys, base_checkpoint, out, "No space left on device")
    assert not (tmp_path / "new").exists()


def test_output_inside_input_is_refused(damaged, capsys):
    expect_error(capsys, damaged, damaged / "converted", "overlaps --input")


def test_python_dash_m_convert_exit_code_and_one_line_error(damaged, tmp_path):
    (damaged / "consolidated.00.pth").unlink()
    proc = subprocess.run([sys.executable, "-m", "convert", "--format", "meta", "--input",
                           str(damaged), "--output", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {damaged}: no consolidated.NN.pth files"
    assert_nothing_written(tmp_path / "out")


# --- damaged bytes and non-finite weights (nothing silent) --------------------------------------

def test_overwritten_tensor_bytes_fail_the_zip_crc(damaged, tmp_path, capsys):
    """4 KiB of tensor data overwritten by 0xFF (1,024 NaN float32s) used to convert with rc 0."""
    import zipfile
    path = damaged / "consolidated.00.pth"
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)            # local file header: name and extra lengths at 26..30
        name_len, extra_len = int.from_bytes(header[26:28], "little"), \
            int.from_bytes(header[28:30], "little")
        assert info.file_size > 256 + 4096
        f.seek(info.header_offset + 30 + name_len + extra_len + 256)   # inside the tensor
        f.write(b"\xff" * 4096)
    expect_error(capsys, damaged, tmp_path / "out", str(path), "CRC-32", info.filename)


def test_non_finite_weight_is_refused_naming_the_tensor(damaged, tmp_path, capsys):
    def poison(state):
        state["layers.1.feed_forward.w2.weight"][3, 5] = float("nan")
        state["norm.weight"][0] = float("inf")
    edit_state(damaged, poison)   # a valid zip whose CRCs match its NaN bytes
    err = expect_error(capsys, damaged, tmp_path / "out", "non-finite", "'norm'",
                       "'feed_forward'", "'w2'")
    assert "1 non-finite value(s)" in err


def test_stale_partial_folder_of_a_dead_process_is_removed(base_checkpoint, tmp_path, capsys):
    """A SIGKILLed convert leaves .OUT.partial-PID behind; the next run removes it and says so."""
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}"
    (stale / "params").mkdir(parents=True)
    (stale / "params" / "chunk").write_bytes(b"\0" * 1024)
    alive = tmp_path / f".out.partial-{os.getppid()}"   # a live writer's folder is kept
    alive.mkdir()
    assert convert_meta(base_checkpoint, out) == 0
    assert not stale.exists() and alive.exists()
    assert f"removed {stale}" in capsys.readouterr().out


def test_sigkill_during_convert_leaves_nothing_a_rerun_does_not_clean(base_checkpoint, tmp_path):
    import signal
    out = tmp_path / "out"
    code = ("import sys, time, gptk_jax.llama.checkpoint as c\n"
            "orig = c._save_params\n"
            "def slow(d, p):\n"
            "    orig(d, p); print('saved', flush=True); time.sleep(60)\n"
            "c._save_params = slow\n"
            "from convert.cli import main\n"
            f"sys.exit(main(['--format', 'meta', '--input', {str(base_checkpoint)!r}, "
            f"'--output', {str(out)!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        for line in proc.stdout:
            if line.startswith("saved"):
                break
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
        assert partial, list(tmp_path.iterdir())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists() and all(p.exists() for p in partial)   # what SIGKILL leaves
    assert convert_meta(base_checkpoint, out) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (out / "config.json").is_file()
