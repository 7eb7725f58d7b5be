"""Device layouts give the same training: one device, a 4-device mesh (data, and data x model
with the trunk sharded), pmap over 4 devices, and two jax.distributed processes on localhost.

Simulated CPU devices need XLA_FLAGS before jax starts, so those runs are subprocesses: this file
run as a script is the worker (`python tests/test_train_parallel.py WORKDIR`).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"training.num_train_steps": 4, "training.log_every_steps": 1,
          "training.checkpoint_every_steps": 0, "data.eval_max_sentences": 8}
LAYOUTS = {"mesh4": ("mesh", 1), "mesh2x2": ("mesh", 2), "pmap4": ("pmap", 1)}


def tiny_config():
    sys.path.insert(0, str(ROOT))
    from configs import tiny
    config = tiny.get_config("linear")
    for key, value in FIELDS.items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    return config


def summary(workdir: Path) -> dict:
    from gptk_jax.training import read_metrics
    metrics = Path(workdir) / "metrics.jsonl"
    return {"train": [r["loss"] for r in read_metrics(metrics, "train")],
            "eval": read_metrics(metrics, "eval")[-1]}


def env(**extra) -> dict:
    out = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    out.pop("XLA_FLAGS", None)
    out.update(extra)
    return out


def assert_same(got: dict, want: dict, what: str):
    assert len(got["train"]) == len(want["train"]) == FIELDS["training.num_train_steps"], what
    np.testing.assert_allclose(got["train"], want["train"], rtol=2e-5, err_msg=what)
    for key in ("loss_gold_o2", "loss_trunk_o3", "top1_gold_o2", "top5_trunk_o3",
                "acceptance_trunk"):
        np.testing.assert_allclose(got["eval"][key], want["eval"][key], rtol=2e-5,
                                   err_msg=f"{what}: eval {key}")


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    import jax
    from gptk_jax.training import train_and_evaluate
    assert jax.device_count() == 1
    workdir = tmp_path_factory.mktemp("one-device")
    train_and_evaluate(tiny_config(), workdir, progress=False)
    return summary(workdir)


@pytest.mark.slow   # trainer subprocesses on 2 virtual devices
def test_mesh_pmap_and_one_device_give_the_same_losses(tmp_path, one_device):
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=ROOT, timeout=400,
                          capture_output=True, text=True,
                          env=env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(LAYOUTS)
    for name, got in results.items():
        assert_same(got, one_device, name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow   # two JAX processes
def test_two_processes_give_the_same_losses_as_one(tmp_path, one_device):
    workdir = tmp_path / "run"
    address = f"127.0.0.1:{_free_port()}"
    overrides = [f"--config.{k}={v}" for k, v in FIELDS.items()]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "gptk_jax.train", "--config", "configs/tiny.py:linear",
         "--workdir", str(workdir), *overrides, f"--coordinator_address={address}",
         "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    assert "over 2 process(es)" in outputs[0][0]
    assert sorted(os.listdir(workdir / "data_state")) == ["4.process0.json", "4.process1.json"]
    assert (workdir / "heads" / "heads.json").is_file()
    assert_same(summary(workdir), one_device, "2 processes")


def _worker(base: Path) -> None:
    import jax
    from gptk_jax.training import train_and_evaluate
    assert jax.device_count() == 4, jax.devices()
    results = {}
    for name, (mode, model) in LAYOUTS.items():
        config = tiny_config()
        config.parallel.mode, config.parallel.model_axis_size = mode, model
        train_and_evaluate(config, base / name, progress=False)
        results[name] = summary(base / name)
    print(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(Path(sys.argv[1]))
