"""The trunk-feature cache in shares (features/cache.py, features/shares.py): shares
built apart are the one-process cache split in row ranges, value for value (to float32
rounding: a share's calls have other lengths; the argmax exactly); a job of two
jax.distributed processes on localhost builds one share each and trains with the losses of one
process; a share missing after the others finished is built where it is missing; a local
build over 2 devices stores the values of 1.

Simulated CPU devices need XLA_FLAGS before jax starts, so the 2-device build is a subprocess:
this file run as a script is its worker (`python tests/test_feature_shares.py TRUNK ROOT`)."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = [70, 5, 9, 40, 3, 66, 12, 35, 8, 90, 6, 38]    # 12 rows: shares of 3 are 4 rows each
BUILD_BATCH = 3


@dataclasses.dataclass(frozen=True)
class Row:                    # what the cache reads of a pipeline row
    tokens: np.ndarray
    prompt_len: int
    index: int


def make_rows():
    rng = np.random.default_rng(0)
    return [Row(rng.integers(0, 256, n).astype(np.int32), max(1, n // 3), 3 * i + 1)
            for i, n in enumerate(LENGTHS)]


def load_trunk(path: Path):
    from gptk_jax.llama.checkpoint import load_converted
    from gptk_jax.training.inputs import Trunk
    model = load_converted(path)
    return Trunk(config=model.config, params=model.params, tokenizer=model.tokenizer,
                 name="random-tiny", path=path)


def build(root: Path, trunk, rows, log=lambda msg: None):
    from gptk_jax.heads.config import HeadConfig
    from gptk_jax.features.cache import FeatureCache
    return FeatureCache.open_or_build(root, trunk, rows, HeadConfig(kind="linear", k=3),
                                      "float32", BUILD_BATCH, argmax_chunk=16, log=log,
                                      progress=False)


def assert_argmax_same_or_tied(got, want, hidden_normed, trunk, gap: float = 1e-4):
    """The trunk's argmax of two builds whose hidden states differ by float32 rounding: equal,
    except where the trunk's own top two logits at that position (from `hidden_normed` through
    its frozen unembedding) are within `gap`, where rounding may pick either; at most 0.1% of
    the positions."""
    from gptk_jax.heads import trunk_unembed
    differ = np.flatnonzero(got != want)
    assert len(differ) <= max(1, len(want) // 1000), f"trunk_argmax: {len(differ)} differ"
    if len(differ):
        logits = np.asarray(trunk_unembed(trunk.config, trunk.params, hidden_normed[differ]))
        top2 = np.sort(logits, axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0] < gap).all(), ("trunk_argmax differs off a tie",
                                                       differ, top2)
        picked = logits[np.arange(len(differ)), np.stack([got[differ], want[differ]])]
        assert (top2[:, 1] - picked < gap).all(), ("an argmax that is not a top logit", differ)


def assert_same_cache(got, want, exact: bool = False, trunk=None):
    """Every array of two caches: spans, pair indices, each field's flat values. exact=False:
    float fields to float32 rounding (a share's rows run in calls of other lengths than one
    process's: 16-multiples of each call's longest row), ids exactly, or, given the trunk, equal
    but where its top two logits tie to rounding (assert_argmax_same_or_tied)."""
    assert got.folder.name == want.folder.name                 # the same fingerprint
    np.testing.assert_array_equal(got.spans, want.spans)
    np.testing.assert_array_equal(np.load(got.folder / "pair_index.npy"),
                                  np.load(want.folder / "pair_index.npy"))
    for key in ("num_rows", "num_positions", "dim", "fields", "dtype"):
        assert got.meta[key] == want.meta[key], key
    assert sorted(got.arrays) == sorted(want.arrays)
    for field, values in got.arrays.items():
        a, b = np.asarray(values), np.asarray(want.arrays[field])
        assert a.shape == b.shape == (want.meta["num_positions"],) + b.shape[1:], field
        if field == "trunk_argmax" and not exact and trunk is not None:
            assert_argmax_same_or_tied(a, b, np.asarray(want.arrays["hidden_normed"]), trunk)
        elif exact or field == "trunk_argmax":
            np.testing.assert_array_equal(a, b, err_msg=field)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=field)


@pytest.fixture(scope="module")
def trunk_path(tmp_path_factory):
    from gptk_jax.training.inputs import ensure_tiny_trunk
    return ensure_tiny_trunk(tmp_path_factory.mktemp("tiny") / "trunk")


@pytest.fixture(scope="module")
def trunk(trunk_path):
    return load_trunk(trunk_path)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, trunk):
    return build(tmp_path_factory.mktemp("one-process"), trunk, make_rows())


def test_shares_built_apart_are_the_one_process_cache(tmp_path, trunk, one_process):
    from gptk_jax.heads.config import HeadConfig
    from gptk_jax.features.cache import (FeatureCache, build_share, cached_fields,
                                            row_spans, write_meta)
    rows, head = make_rows(), HeadConfig(kind="linear", k=3)
    assert one_process.meta["shares"] == 1
    folder = tmp_path / one_process.folder.name
    spans, fields = row_spans(rows, head), cached_fields(head)
    for index in (2, 0, 1):                              # any order: each its own row range
        assert build_share(folder, trunk, rows, spans, fields, "float32", BUILD_BATCH, 16,
                           True, index, 3)
    assert not build_share(folder, trunk, rows, spans, fields, "float32", BUILD_BATCH, 16,
                           True, 1, 3)                   # complete: kept, not rebuilt
    write_meta(folder, trunk, rows, spans, fields, "float32", 3)
    shares = FeatureCache(folder)
    assert [s["rows"] for s in shares.shares] == [[0, 4], [4, 8], [8, 12]]
    bounds = [s["positions"] for s in shares.shares]
    assert bounds[0][0] == 0 and bounds[0][1] == bounds[1][0] and bounds[1][1] == bounds[2][0]
    assert bounds[2][1] == one_process.meta["num_positions"]
    # each share's trunk ran on its own rows only (3 rows per call, bucketed by length)
    assert sum(s["build"]["row_tokens"] for s in shares.shares) == sum(LENGTHS)
    assert [s["build"]["row_tokens"] for s in shares.shares] == [
        sum(LENGTHS[0:4]), sum(LENGTHS[4:8]), sum(LENGTHS[8:12])]
    assert_same_cache(shares, one_process)
    # a slice across a share boundary, and a training batch with rows of all three shares
    field = "hidden_normed"
    edge = bounds[1][0]
    np.testing.assert_allclose(shares.arrays[field][edge - 3:edge + 2],
                               np.asarray(one_process.arrays[field])[edge - 3:edge + 2],
                               rtol=1e-5, atol=1e-5)
    batch = {"tokens": np.zeros((4, 96), np.int32),
             "example_index": np.asarray([rows[9].index, -1, rows[4].index, rows[0].index],
                                         np.int32)}
    a, b = shares.attach(batch), one_process.attach(batch)
    for name in shares.arrays:
        if name == "trunk_argmax":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5, err_msg=name)
    # a share gone from a complete cache is an error naming it
    (folder / "shares" / "1-of-3" / "share.json").unlink()
    from gptk_jax.features.shares import CacheError
    with pytest.raises(CacheError, match=r"1-of-3/share.json is missing.* all 3 shares"):
        FeatureCache(folder)


def _as_process(monkeypatch, index: int, count: int):
    """This process plays process `index` of `count` whose other processes never show up:
    the collectives are the identity (no barrier to wait at) and the wait for other shares is
    zero, so the job's own fallback path runs."""
    import jax
    from gptk_jax.features import cache as features
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(features, "all_processes", lambda flag: bool(flag))
    monkeypatch.setattr(features, "SHARE_WAIT_SECONDS", 0.0)


def test_a_missing_share_is_built_where_it_is_missing(tmp_path, trunk, one_process,
                                                      monkeypatch):
    rows, logged = make_rows(), []
    _as_process(monkeypatch, 0, 2)
    cache = build(tmp_path, trunk, rows, logged.append)
    warned = [m for m in logged if "share 1-of-2 is not in" in m]
    assert len(warned) == 1 and "building it here too" in warned[0]
    assert [s["built_by"]["process_index"] for s in cache.shares] == [0, 0]
    assert_same_cache(cache, one_process)


def test_a_restart_keeps_complete_shares(tmp_path, trunk, one_process, monkeypatch):
    from gptk_jax.heads.config import HeadConfig
    from gptk_jax.features.cache import build_share, cached_fields, row_spans
    rows, head, logged = make_rows(), HeadConfig(kind="linear", k=3), []
    folder = tmp_path / one_process.folder.name
    args = (folder, trunk, rows, row_spans(rows, head), cached_fields(head), "float32",
            BUILD_BATCH, 16, True)
    build_share(*args, 1, 2)                 # left complete by an interrupted 2-process start
    build_share(*args, 0, 3)                 # and one of another process count
    kept = (folder / "shares" / "1-of-2" / "share.json").read_text()
    _as_process(monkeypatch, 0, 2)
    cache = build(tmp_path, trunk, rows, logged.append)
    assert not [m for m in logged if "building it here too" in m]
    assert (folder / "shares" / "1-of-2" / "share.json").read_text() == kept   # not rebuilt
    assert sorted(p.name for p in (folder / "shares").iterdir()) == ["0-of-2", "1-of-2"]
    assert "this process's rows [0, 6) built" in logged[-1]
    assert_same_cache(cache, one_process)


def test_a_build_over_two_local_devices_stores_the_same_values(tmp_path, trunk_path,
                                                               one_process):
    from gptk_jax.features.cache import FeatureCache
    proc = subprocess.run([sys.executable, __file__, str(trunk_path), str(tmp_path)], cwd=ROOT,
                          timeout=300, capture_output=True, text=True,
                          env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    cache = FeatureCache(tmp_path / one_process.folder.name)
    (share,) = cache.shares
    assert share["local_devices"] == 2
    # 3 rows per call rounded up to 4 (2 per device): sorted 3 5 6 8 | 9 12 35 38 | 40 66 70 90,
    # 3 calls of 4 rows at T 16, 48, 96; one process: 3 5 6 | 8 9 12 | 35 38 40 | 66 70 90
    assert share["build"]["trunk_tokens"] == 4 * (16 + 48 + 96)
    assert one_process.shares[0]["build"]["trunk_tokens"] == 3 * (16 + 16 + 48 + 96)
    assert_same_cache(cache, one_process)


def _env(**extra) -> dict:
    out = dict(os.environ, JAX_PLATFORMS="cpu")
    out.pop("XLA_FLAGS", None)
    out.update(extra)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# tiny config (configs/tiny.py:linear, 64 pairs, global batch 8) with the cache on
FIELDS = {"training.num_train_steps": 4, "training.log_every_steps": 1,
          "training.checkpoint_every_steps": 0, "data.eval_max_sentences": 8,
          "features.cache": True}


def _losses(workdir: Path) -> dict:
    from gptk_jax.training import read_metrics
    metrics = Path(workdir) / "metrics.jsonl"
    return {"train": [r["loss"] for r in read_metrics(metrics, "train")],
            "eval": read_metrics(metrics, "eval")[-1]}


def _cache_folder(root: Path) -> Path:
    """The training rows' cache (the validation rows' cache sits beside it: the fewer rows)."""
    from gptk_jax.features.cache import FeatureCache
    folders = [p for p in root.iterdir() if not p.name.startswith(".")]
    return max(folders, key=lambda p: FeatureCache(p).meta["num_rows"])


@pytest.mark.slow   # two trainer processes
def test_two_processes_build_one_share_each_and_train_as_one(tmp_path, trunk_path):
    from gptk_jax.training import train_and_evaluate
    from gptk_jax.features.cache import FeatureCache
    from _train_helpers import with_fields
    from configs import tiny
    fields = dict(FIELDS, trunk_checkpoint=str(trunk_path))
    one_root = tmp_path / "cache-1"
    train_and_evaluate(with_fields(tiny.get_config("linear"), dict(
        fields, **{"features.cache_dir": str(one_root)})), tmp_path / "one", progress=False)
    want = _losses(tmp_path / "one")

    two_root, workdir = tmp_path / "cache-2", tmp_path / "two"
    address = f"127.0.0.1:{_free_port()}"
    overrides = [f"--config.{k}={v}" for k, v in fields.items()]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "gptk_jax.train", "--config", "configs/tiny.py:linear",
         "--workdir", str(workdir), *overrides, f"--config.features.cache_dir={two_root}",
         f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=500) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    log = outputs[0][0]
    assert "over 2 process(es)" in log and "2 share(s), this process's rows" in log
    for _, err in outputs:
        assert "building it here too" not in err

    one, two = FeatureCache(_cache_folder(one_root)), FeatureCache(_cache_folder(two_root))
    assert one.meta["shares"] == 1 and two.meta["shares"] == 2
    rows = one.meta["num_rows"]
    assert [s["rows"] for s in two.shares] == [[0, rows // 2], [rows // 2, rows]]
    # share i was built by process i, each over its own rows only
    builders = [s["built_by"] for s in two.shares]
    assert [b["process_index"] for b in builders] == [0, 1]
    assert [b["process_count"] for b in builders] == [2, 2]
    assert builders[0]["pid"] != builders[1]["pid"]
    assert sum(s["build"]["row_tokens"] for s in two.shares) == \
        one.shares[0]["build"]["row_tokens"]
    assert_same_cache(two, one, trunk=load_trunk(trunk_path))

    got = _losses(workdir)
    assert len(got["train"]) == len(want["train"]) == FIELDS["training.num_train_steps"]
    np.testing.assert_allclose(got["train"], want["train"], rtol=1e-6)
    for key in ("loss_gold_o2", "loss_trunk_o3", "top1_gold_o2", "acceptance_trunk"):
        np.testing.assert_allclose(got["eval"][key], want["eval"][key], rtol=1e-6, err_msg=key)


def _worker(trunk_path: Path, root: Path) -> None:
    import jax
    assert len(jax.local_devices()) == 2, jax.devices()
    build(root, load_trunk(trunk_path), make_rows())


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
