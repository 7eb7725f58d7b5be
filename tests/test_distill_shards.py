"""Self-distillation in shards (gptk_jax.distill --num-shards/--shard-index/--merge,
gptk_jax/distillation/shards.py) on the random tiny trunk: each shard translates only its
own source lines, and the merge is the one-process file line for line; a missing, incomplete
or foreign shard is refused by name and counts."""

import json
import subprocess
import sys

import pytest

from gptk_jax.distill import main as distill_main

SOURCES = ["Guten Morgen.", "", "Das Haus ist klein.", "Ja.", "Wir danken Ihnen.",
           "Die Katze schläft.", "Es regnet heute.", "Guten Morgen."]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from gptk_jax.training.inputs import ensure_tiny_trunk
    root = tmp_path_factory.mktemp("distill-shards")
    trunk = ensure_tiny_trunk(root / "trunk")
    (root / "src.de").write_text("".join(s + "\n" for s in SOURCES))
    whole = root / "whole.en"              # the one-process distillation
    assert distill_main(_args(root, trunk, whole, "--batch-size", "2", "--chunk", "3")) == 0
    return root, trunk, whole.read_text().split("\n")[:-1]


def _args(root, trunk, output, *extra):
    return ["--checkpoint", str(trunk), "--input", str(root / "src"), "--output", str(output),
            "--max-new-tokens", "5", "--no-progress", *extra]


def _shard(out, i, n):
    return out.with_name(f"{out.name}.shard{i}-of-{n}")


@pytest.mark.slow   # three distill runs
def test_two_shards_merge_into_the_one_process_file(data, tmp_path, capsys):
    root, trunk, whole = data
    assert len(whole) == len(SOURCES) and len(set(whole)) > 2    # the lines tell sources apart
    out = tmp_path / "d.en"
    # shard 0 stops after one line (resumed below, with other decoding settings)
    assert distill_main(_args(root, trunk, out, "--num-shards", "2", "--shard-index", "0",
                              "--stop-after", "1", "--k", "1")) == 0
    assert distill_main(_args(root, trunk, out, "--num-shards", "2", "--shard-index", "1",
                              "--batch-size", "3")) == 0
    said = capsys.readouterr().out
    assert "shards [0] of 2 are not complete yet" in said and not out.exists()
    assert distill_main(_args(root, trunk, out, "--num-shards", "2", "--shard-index", "0")) == 0
    assert f"merged 2 shards into {out}: 8 lines" in capsys.readouterr().out
    # each shard holds its own source lines only: shard i line j = source line i + 2j
    for i in range(2):
        got = _shard(out, i, 2).read_text().split("\n")[:-1]
        assert got == whole[i::2], i
        record = json.loads((tmp_path / f"d.en.shard{i}-of-2.json").read_text())
        assert record["shard"] == {"index": i, "count": 2} and record["all_sources"] == 8
        assert record["lines_written"] == record["sources"] == 4
    assert out.read_text().split("\n")[:-1] == whole
    assert out.read_text() == (root / "whole.en").read_text()
    merged = json.loads((tmp_path / "d.en.json").read_text())
    one = json.loads((root / "whole.en.json").read_text())
    for key in ("format", "input", "prompt_format", "model", "max_new_tokens",
                "stop_ids_sha256", "sources", "lines_written", "generated_tokens"):
        assert merged[key] == one[key], key
    assert "shard" not in merged and merged["merged_from"] == ["d.en.shard0-of-2",
                                                               "d.en.shard1-of-2"]
    assert [(s["shard"], s["first_line"], s["lines"]) for s in merged["sessions"]] == \
        [(0, 0, 1), (0, 1, 3), (1, 0, 4)]
    # training reads the merge, and refuses a shard file as a target side
    from gptk_jax.data.wmt import DataError
    from gptk_jax.training.inputs import _pairs_with_target_file
    assert len(_pairs_with_target_file(str(root / "src"), "de", out, None)) == 7  # 1 empty
    with pytest.raises(DataError, match=r"shard 1 of 2 .* --merge"):
        _pairs_with_target_file(str(root / "src"), "de", _shard(out, 1, 2), None)
    # a merge by hand again: the same file
    before = out.read_bytes()
    assert distill_main(["--output", str(out), "--num-shards", "2", "--merge"]) == 0
    assert out.read_bytes() == before


def test_three_uneven_shards_merged_by_hand(data, tmp_path):
    root, trunk, whole = data
    out = tmp_path / "d3.en"
    for i in (2, 0):                         # shards 2 and 0 of 3 over the first 5 sources
        assert distill_main(_args(root, trunk, out, "--num-shards", "3", "--shard-index",
                                  str(i), "--max-pairs", "5")) == 0
    assert not out.exists()
    assert distill_main(["--output", str(out), "--num-shards", "3", "--merge"]) == 2
    assert distill_main(_args(root, trunk, out, "--num-shards", "3", "--shard-index", "1",
                              "--max-pairs", "5")) == 0
    assert [len(_shard(out, i, 3).read_text().split("\n")) - 1 for i in range(3)] == [2, 2, 1]
    assert out.read_text().split("\n")[:-1] == whole[:5]
    assert distill_main(["--output", str(out), "--num-shards", "3", "--merge", "--input",
                         str(root / "src")]) == 0
    assert distill_main(["--output", str(out), "--num-shards", "3", "--merge", "--input",
                         str(tmp_path / "other")]) == 2


def test_merge_names_a_missing_an_incomplete_or_a_foreign_shard(data, tmp_path, capsys):
    root, trunk, _ = data
    out = tmp_path / "m.en"
    merge = ["--output", str(out), "--num-shards", "2", "--merge"]
    assert distill_main(_args(root, trunk, out, "--num-shards", "2", "--shard-index", "1",
                              "--stop-after", "3")) == 0
    capsys.readouterr()
    assert distill_main(merge) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"shard 0 of 2: {_shard(out, 0, 2)} is missing" in err[0]
    assert distill_main(_args(root, trunk, out, "--num-shards", "2", "--shard-index", "0")) == 0
    capsys.readouterr()
    assert distill_main(merge) == 2
    err = capsys.readouterr().err
    assert f"shard 1 of 2 is incomplete: {_shard(out, 1, 2)} has 3 lines" in err
    assert "of the 4 it needs" in err and "of the first 8" in err
    # shard 1 finished with another max-new-tokens: another distillation, refused on resume
    assert distill_main(_args(root, trunk, out, "--num-shards", "2", "--shard-index", "1",
                              "--max-new-tokens", "6")) == 2
    assert "max_new_tokens" in capsys.readouterr().err
    assert distill_main(_args(root, trunk, out, "--num-shards", "2", "--shard-index", "1")) == 0
    assert out.is_file()                                       # merged by the last shard
    # an OUTPUT that is not a merge is never overwritten
    other = tmp_path / "taken.en"
    for i in range(2):
        for suffix in ("", ".json"):
            src = tmp_path / f"m.en.shard{i}-of-2{suffix}"
            (tmp_path / f"taken.en.shard{i}-of-2{suffix}").write_bytes(src.read_bytes())
    other.write_text("mine\n")
    capsys.readouterr()
    assert distill_main(["--output", str(other), "--num-shards", "2", "--merge"]) == 2
    assert f"{other} exists and is not a merge" in capsys.readouterr().err
    assert other.read_text() == "mine\n"
    # shards of two distillations (one record says another max-new-tokens) are not merged
    other.unlink()
    record = tmp_path / "taken.en.shard1-of-2.json"
    record.write_text(json.dumps(dict(json.loads(record.read_text()), max_new_tokens=6)))
    assert distill_main(["--output", str(other), "--num-shards", "2", "--merge"]) == 2
    err = capsys.readouterr().err
    assert "are shards of different distillations: they differ in max_new_tokens" in err
    assert not other.exists()


@pytest.mark.parametrize("extra, says", [
    (["--num-shards", "2", "--shard-index", "2"], "--shard-index 2 is out of range for "
                                                  "--num-shards 2 (0..1)"),
    (["--num-shards", "2"], "--num-shards 2 needs --shard-index"),
    (["--num-shards", "0"], "--num-shards must be >= 1"),
    (["--num-shards", "2", "--shard-index", "0", "--merge"], "drop --shard-index"),
])
def test_bad_shard_arguments_one_line_exit_2(data, tmp_path, extra, says):
    root, trunk, _ = data
    out = tmp_path / "bad.en"
    proc = subprocess.run([sys.executable, "-m", "gptk_jax.distill",
                           *_args(root, trunk, out, *extra)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
