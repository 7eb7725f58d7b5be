"""MTP head training: hand-computed loss pieces, frozen trunk, every config family, resume after
SIGKILL / SIGTERM, bad input, self-distillation (the real-trunk run: test_real_heads.py)."""

import dataclasses
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _train_helpers import HAND_ALL, tiny_trunk, with_fields  # noqa: F401 (tiny_trunk: a fixture)
from _train_helpers import hand_batch as _hand_batch
from conftest import ROOT

from gptk_jax.data.prompts import shift_targets
from gptk_jax.heads import HeadConfig, make_head, shifted_next_tokens
from gptk_jax.llama.model import Llama, init_params
from gptk_jax.training import (ConfigKeyError, TrainingError, acceptance_estimate, read_metrics,
                               train_and_evaluate)
from gptk_jax.training import step as step_lib
from gptk_jax.training.inputs import tiny_trunk_config
from gptk_jax.training.settings import ParallelSettings
from gptk_jax.training.sharding import Parallel

FAMILY_CONFIGS = ("lstm_smollm2_wmt14", "poma_smollm2_wmt14", "linear_smollm2_wmt14")
CONFIG_NAMES = ("base", "tiny", "lstm_llama3_2_1b_wmt14", "poma_llama3_2_1b_wmt14",
                "linear_llama3_2_1b_wmt14") + FAMILY_CONFIGS
RESUME_STEPS = 30


def get_config(name="tiny", arg=None):
    module = importlib.import_module(f"configs.{name}")
    return module.get_config(arg) if arg else module.get_config()




def cli_env(tmp_cache: Path) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def train_losses(workdir: Path) -> dict:
    return {r["step"]: r for r in read_metrics(Path(workdir) / "metrics.jsonl", "train")}


# --------------------------------------------------------------------------------------------
# Pure pieces, by hand
# --------------------------------------------------------------------------------------------

def test_acceptance_estimate_by_hand():
    assert acceptance_estimate([]) == 1.0
    assert acceptance_estimate([0.5, 0.4]) == pytest.approx(1 + 0.5 + 0.5 * 0.4)      # 1.7
    assert acceptance_estimate([0.8, 0.5, 0.25]) == pytest.approx(1 + 0.8 + 0.4 + 0.1)  # 2.3
    assert acceptance_estimate([1.0, 1.0, 1.0]) == 4.0
    assert acceptance_estimate([0.0, 0.9]) == 1.0


def test_argmax_targets_and_supervised_positions_by_hand():
    argmax = jnp.array([[5, 6, 7, 8]])
    np.testing.assert_array_equal(step_lib.argmax_targets(argmax, 2),
                                  [[[5, 6], [6, 7], [7, 8], [8, 0]]])
    # prompt 0..2, target 3..5 (t0 t1 EOS), pads 6..7; offsets 1..3
    loss_mask = np.array([[0, 0, 0, 1, 1, 1, 0, 0]], bool)
    _, target_mask = shift_targets(np.arange(8)[None], loss_mask, 3)
    every = step_lib.supervised_positions(jnp.asarray(target_mask), jnp.asarray(loss_mask), False)
    np.testing.assert_array_equal(every, [[1, 1, 1, 1, 1, 0, 0, 0]])  # t=0 predicts t+3 = 3
    first = step_lib.supervised_positions(jnp.asarray(target_mask), jnp.asarray(loss_mask), True)
    np.testing.assert_array_equal(first, [[0, 0, 1, 0, 0, 0, 0, 0]])  # the last prompt token
    index, valid = step_lib.gather_index(every, 6)
    np.testing.assert_array_equal(index, [[0, 1, 2, 3, 4, 0]])
    np.testing.assert_array_equal(valid, [[1, 1, 1, 1, 1, 0]])


# HAND_ALL (from _train_helpers): (row, position, offset) with a target, for _hand_batch
HAND_FIRST = [(0, 2, 1), (0, 2, 2), (0, 2, 3), (1, 1, 1), (1, 1, 2)]  # (1,1,3) -> pad: masked


@pytest.mark.parametrize("targets,first_only,chunk,groups", [
    ("gold", False, 0, 1), ("gold", True, 0, 1), ("trunk_argmax", False, 0, 1),
    # packed positions: 8 of 16 [B,M] entries valid, chunks of 3 -> 3 computed, 3 skipped
    ("gold", False, 3, 1), ("gold", True, 3, 2), ("trunk_argmax", False, 4, 2)])
def test_loss_uses_the_offset_targets_on_a_hand_case(tiny_trunk, targets, first_only, chunk,
                                                     groups):
    trunk_config, trunk_params = tiny_trunk
    head_config = HeadConfig(kind="linear", k=3, offsets=(1, 2, 3))
    head = make_head(head_config, trunk_config)
    batch = _hand_batch()
    head_params = {"proj": 0.3 * jax.random.normal(jax.random.PRNGKey(2), (3, 32, 32))}
    out = Llama(trunk_config).apply({"params": trunk_params}, batch["tokens"], batch["positions"],
                                    token_mask=batch["token_mask"])
    trunk_argmax = np.asarray(jnp.argmax(out.logits, -1))
    feats = step_lib._features(batch, out.hidden, out.hidden_normed,
                               shifted_next_tokens(jnp.asarray(batch["tokens"]), 3))
    full = head.apply({"params": head_params}, trunk_params, feats,
                      method=head.train_logits)                               # [B,T,J,V]
    log_probs = np.asarray(jax.nn.log_softmax(full, -1))
    expected_sum, expected_count = np.zeros(3), np.zeros(3)
    for b, t, o in (HAND_FIRST if first_only else HAND_ALL):
        target = batch["tokens"][b, t + o] if targets == "gold" else trunk_argmax[b, t + o - 1]
        expected_sum[o - 1] -= log_probs[b, t, o - 1, target]
        expected_count[o - 1] += 1

    cfg = step_lib.StepConfig(trunk_config=trunk_config, head_config=head_config, targets=targets,
                              offset_weights=(2.0, 1.0, 1.0), first_target_tokens_only=first_only,
                              positions_per_row=8, argmax_chunk=3, position_chunk=chunk,
                              pack_groups=groups)
    tx = optax.sgd(0.0)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), head_params=head_params,
                                opt_state=tx.init(head_params), rng=jax.random.PRNGKey(0))
    _, metrics = jax.jit(lambda s, p, b: step_lib.train_step(cfg, tx, s, p, b))(
        state, trunk_params, batch)
    np.testing.assert_allclose(metrics["count"], expected_count)
    np.testing.assert_allclose(metrics["loss_sum"], expected_sum, rtol=1e-5)
    means = expected_sum / expected_count
    np.testing.assert_allclose(metrics["objective"], (2 * means[0] + means[1] + means[2]) / 4,
                               rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "poma"])
@pytest.mark.parametrize("chunk,groups,tied", [(3, 1, False), (5, 2, False), (64, 1, False),
                                               (5, 2, True)])
def test_packed_positions_give_the_same_update(tiny_trunk, kind, chunk, groups, tied):
    """Packing the supervised positions (and skipping empty chunks) changes the summation order
    only: the same loss, metrics and parameter update as the per-row [B,M] layout, and the same
    evaluation sums."""
    trunk_config, trunk_params = tiny_trunk
    if tied:   # the fused loss reads the embedding table [V,D] instead of the kernel [D,V]
        trunk_config = dataclasses.replace(trunk_config, tie_embeddings=True)
        trunk_params = jax.jit(lambda k: init_params(trunk_config, k, stacked=False))(
            jax.random.PRNGKey(3))
    head_config = HeadConfig(kind=kind, k=3, offsets=(2, 3), poma_max_positions=16)
    batch = _hand_batch()
    tx = optax.sgd(1.0)  # the update is minus the gradient

    def config(position_chunk, pack_groups):
        return step_lib.StepConfig(trunk_config=trunk_config, head_config=head_config,
                                   targets="trunk_argmax", offset_weights=(1.0, 2.0),
                                   first_target_tokens_only=False, positions_per_row=8,
                                   argmax_chunk=8, position_chunk=position_chunk,
                                   pack_groups=pack_groups)

    def step(position_chunk, pack_groups):
        cfg = config(position_chunk, pack_groups)
        state = step_lib.init_train_state(cfg, tx, trunk_params, 0)
        # non-trivial head params (the zero / trunk-copy init would make offsets identical)
        state = state.replace(head_params=jax.tree.map(
            lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape),
            state.head_params))
        new, metrics = jax.jit(lambda s, p, b: step_lib.train_step(cfg, tx, s, p, b))(
            state, trunk_params, batch)
        return jax.tree.map(np.asarray, (new.head_params, metrics))

    (per_row, m_row), (packed, m_packed) = step(0, 1), step(chunk, groups)
    for key in ("objective", "loss_sum", "count", "top1", "dropped_positions"):
        np.testing.assert_allclose(m_packed[key], m_row[key], rtol=1e-5, err_msg=key)
    assert m_row["count"].sum() > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 packed, per_row)

    def evaluate(position_chunk, pack_groups):
        cfg = config(position_chunk, pack_groups)
        return jax.tree.map(np.asarray, jax.jit(
            lambda h, p, b: step_lib.eval_step(cfg, h, p, b))(per_row, trunk_params, batch))

    e_row, e_packed = evaluate(0, 1), evaluate(chunk, groups)
    assert sorted(e_packed) == sorted(e_row)
    assert e_row["top5_trunk"].sum() > 0
    for key in e_row:
        np.testing.assert_allclose(e_packed[key], e_row[key], rtol=1e-5, err_msg=key)


# --------------------------------------------------------------------------------------------
# Frozen trunk
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "poma"])
def test_trunk_is_bit_identical_and_has_no_optimizer_state(tiny_trunk, kind):
    trunk_config, trunk_params = tiny_trunk
    before = jax.tree.map(np.array, trunk_params)
    head_config = HeadConfig(kind=kind, k=3, lstm_layers=1, lstm_dropout=0.0)
    cfg = step_lib.StepConfig(trunk_config=trunk_config, head_config=head_config, targets="gold",
                              offset_weights=(1.0, 1.0), first_target_tokens_only=False,
                              positions_per_row=8, argmax_chunk=8)
    tx = optax.adamw(1e-2)
    parallel = Parallel(ParallelSettings(), 2)
    state = parallel.put_state(step_lib.init_train_state(cfg, tx, trunk_params, 0))
    placed_trunk = parallel.put_trunk(trunk_params)
    train = parallel.compile_train(lambda s, p, b, axis_name=None:
                                   step_lib.train_step(cfg, tx, s, p, b, axis_name))
    head_before = jax.tree.map(np.array, state.head_params)
    for _ in range(2):
        state, _ = train(state, placed_trunk, parallel.put_batch(_hand_batch()))
    # the trunk, on the host and on the device, is bit for bit what it was
    for a, b, c in zip(jax.tree.leaves(before), jax.tree.leaves(trunk_params),
                       jax.tree.leaves(placed_trunk)):
        assert a.dtype == np.asarray(b).dtype and np.array_equal(a, np.asarray(b))
        assert np.array_equal(a, np.asarray(c))
    # the heads did train
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in
               zip(jax.tree.leaves(head_before), jax.tree.leaves(state.head_params)))
    # optimizer state: Adam moments of the head params only
    head_paths = {jax.tree_util.keystr(p) for p, _ in
                  jax.tree_util.tree_leaves_with_path(state.head_params)}
    head_size = sum(x.size for x in jax.tree.leaves(state.head_params))
    moment_leaves = [(jax.tree_util.keystr(p), x) for p, x in
                     jax.tree_util.tree_leaves_with_path(state.opt_state) if np.ndim(x) > 0]
    assert sum(x.size for _, x in moment_leaves) == 2 * head_size   # mu + nu, nothing else
    assert all(any(path.endswith(h) for h in head_paths) for path, _ in moment_leaves)
    assert not any(k in path for path, _ in moment_leaves
                   for k in ("tok_embeddings", "layers", "'output'", "'norm'"))


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------

SMOKE_FIELDS = {"trunk_checkpoint": "random-tiny", "data.max_train_pairs": 16,
                "data.truncate": "truncate_target", "data.eval_max_sentences": 4,
                "training.global_batch_size": 4, "training.num_train_steps": 1,
                "training.eval_at_start": False, "training.log_every_steps": 1,
                "features.build_batch_size": 4}


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_is_valid_and_documented(name):
    from gptk_jax.training.optim import make_optimizer
    from gptk_jax.training.settings import RunSettings
    settings = RunSettings.from_config(get_config(name))
    make_head(settings.head, tiny_trunk_config())
    make_optimizer(settings.optimizer, 100)
    source = (ROOT / "configs" / f"{name}.py").read_text()
    assert source.startswith('"""')
    if name == "base":     # every field carries a comment
        fields = [l for l in source.splitlines() if l.strip().startswith(("config.", "head.",
                  "data.", "loss.", "opt.", "train.", "par.", "feat.")) and " = " in l
                  and "ConfigDict()" not in l]
        assert fields and all("#" in l for l in fields), [l for l in fields if "#" not in l]


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_one_step_smoke_run_of_every_config_family(tmp_path, name):
    config = with_fields(get_config(name), SMOKE_FIELDS)
    config.data.shots = min(config.data.shots, 1)      # bytes: five shots do not fit a tiny row
    result = train_and_evaluate(config, tmp_path, progress=False)
    assert result["status"] == "completed" and result["step"] == 1
    assert np.isfinite(result["train"]["loss"])
    assert 1.0 <= result["eval"]["acceptance_trunk"] <= config.head.k
    assert (tmp_path / "heads" / "heads.json").is_file()
    assert list((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "feature_cache").is_dir() == bool(config.features.cache)


def _resume_fields(workdir_steps=RESUME_STEPS):
    return {"training.num_train_steps": workdir_steps, "training.checkpoint_every_steps": 3,
            "training.log_every_steps": 1, "data.eval_prefix": ""}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted tiny run (linear head): the losses the resumed runs must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    result = train_and_evaluate(with_fields(get_config(), _resume_fields()), workdir,
                                progress=False)
    assert result["status"] == "completed"
    return train_losses(workdir)


def _assert_same_losses(got: dict, want: dict):
    assert sorted(got) == sorted(want) == list(range(1, RESUME_STEPS + 1))
    for step in want:
        assert got[step]["tokens"] == want[step]["tokens"], f"other batch at step {step}"
        np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=1e-6,
                                   err_msg=f"step {step}")


@pytest.mark.slow   # trainer subprocesses, one killed
def test_resume_after_sigkill_gives_the_same_losses(tmp_path, reference_run):
    workdir = tmp_path / "run"
    overrides = [f"--config.{k}={v}" for k, v in _resume_fields().items()]
    cmd = [sys.executable, "-m", "gptk_jax.train", "--config", "configs/tiny.py",
           "--workdir", str(workdir), *overrides]
    env = cli_env(tmp_path / "jax-cache")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and max(train_losses(workdir), default=0) >= 7:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    killed_at = max(train_losses(workdir))
    assert killed_at < RESUME_STEPS, "the run finished before it could be killed"
    restart = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert "resumed from" in restart.stdout
    _assert_same_losses(train_losses(workdir), reference_run)


@pytest.mark.slow   # a trainer subprocess stopped by SIGTERM, then rerun
def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes_identically(tmp_path, reference_run):
    config = with_fields(get_config(), _resume_fields())
    metrics = tmp_path / "metrics.jsonl"

    def send_sigterm():
        deadline = time.time() + 120
        while time.time() < deadline:
            if metrics.is_file() and max(train_losses(tmp_path), default=0) >= 4:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=send_sigterm, daemon=True)
    killer.start()
    first = train_and_evaluate(config, tmp_path, progress=False)
    killer.join()
    assert first["status"] == "preempted" and first["step"] < RESUME_STEPS
    assert (tmp_path / "checkpoints" / str(first["step"])).is_dir()
    second = train_and_evaluate(config, tmp_path, progress=False)
    assert second["status"] == "completed" and second["step"] == RESUME_STEPS
    _assert_same_losses(train_losses(tmp_path), reference_run)


def test_nan_loss_stops_with_an_error_naming_the_step(tmp_path):
    # Adam's first update moves every weight by lr: an infinite one makes step 2's loss NaN.
    config = with_fields(get_config(), {"optimizer.learning_rate": float("inf"),
                                        "optimizer.grad_clip_norm": 0.0,
                                        "data.eval_prefix": ""})
    with pytest.raises(TrainingError, match=r"non-finite loss at step 2\b"):
        train_and_evaluate(config, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints" / "2").exists()


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def test_unknown_config_key_is_a_clear_error(tmp_path):
    config = get_config()
    config.optimizer.lerning_rate = 1e-3
    with pytest.raises(ConfigKeyError, match=r"optimizer\.lerning_rate.*learning_rate"):
        train_and_evaluate(config, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "gptk_jax.train", "--config", "configs/tiny.py",
                           "--workdir", str(tmp_path), "--config.optimizer.lerning_rate=0.1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode != 0
    assert "lerning_rate" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_folder_that_is_not_a_converted_model(tmp_path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "weights.bin").write_bytes(b"\0")
    config = with_fields(get_config(), {"trunk_checkpoint": str(not_a_model)})
    with pytest.raises(TrainingError, match=r"trunk_checkpoint.*not a converted model"):
        train_and_evaluate(config, tmp_path / "run")


def test_empty_training_set_after_filtering(tmp_path):
    config = with_fields(get_config(), {"data.max_len": 12, "data.truncate": "drop"})
    with pytest.raises(TrainingError, match=r"training set.*no examples left after filtering"):
        train_and_evaluate(config, tmp_path)


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(TrainingError, match=r"workdir .* is not writable"):
        train_and_evaluate(get_config(), blocker / "run")


# --------------------------------------------------------------------------------------------
# Self-distillation
# --------------------------------------------------------------------------------------------

def test_distill_is_line_aligned_resumable_and_trainable(tmp_path):
    from gptk_jax.distill import main as distill_main
    from gptk_jax.training.inputs import ensure_tiny_trunk, read_train_pairs
    from gptk_jax.training.settings import RunSettings

    trunk = ensure_tiny_trunk(tmp_path / "trunk")
    sources = ["Guten Morgen.", "", "Das Haus ist klein.", "Ja.", "Wir danken Ihnen."]
    (tmp_path / "src.de").write_text("".join(s + "\n" for s in sources))
    (tmp_path / "src.en").write_text("".join("x\n" for _ in sources))
    out = tmp_path / "distilled.en"

    def args(output):
        return ["--checkpoint", str(trunk), "--input", str(tmp_path / "src"), "--output",
                str(output), "--batch-size", "2", "--max-new-tokens", "6", "--no-progress"]
    assert distill_main(args(out) + ["--max-pairs", "3"]) == 0
    first = out.read_text().split("\n")[:-1]
    assert len(first) == 3 and first[1] == ""                 # empty source: empty line
    with open(out, "a") as f:
        f.write("partial line from a crash")
    assert distill_main(args(out)) == 0
    lines = out.read_text().split("\n")[:-1]
    assert len(lines) == len(sources) and lines[:3] == first
    again = tmp_path / "again.en"
    assert distill_main(args(again)) == 0
    assert again.read_text() == out.read_text()
    config = with_fields(get_config(), {"data.train_prefixes": (str(tmp_path / "src"),),
                                        "data.train_target_files": (str(out),)})
    pairs = read_train_pairs(RunSettings.from_config(config).data)
    kept = [(s, t) for s, t in zip(sources, lines) if s and t]
    assert [(p.src, p.tgt) for p in pairs] == kept

# The real-trunk training run (slow) lives in tests/test_real_heads.py, where its heads are
# reused for the exactness tests.
