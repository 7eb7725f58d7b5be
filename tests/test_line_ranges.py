"""data.train_line_ranges / data.eval_line_range / data.eval_target_file: the lines read, and
clear errors for ranges that are malformed or past the end of a file."""

import pytest

from gptk_jax.data.wmt import DataError, lines_in_range, read_parallel_text
from gptk_jax.training.inputs import read_train_pairs
from gptk_jax.training.settings import ConfigKeyError, DataSettings, RunSettings, TrainingError


def write_corpus(folder, name, n, empty=()):
    src = [("" if i in empty else f"de {i}") for i in range(1, n + 1)]
    tgt = [f"en {i}" for i in range(1, n + 1)]
    (folder / f"{name}.de").write_text("\n".join(src) + "\n")
    (folder / f"{name}.en").write_text("\n".join(tgt) + "\n")
    return str(folder / name)


def data(**fields):
    base = dict(train_prefixes=("a",), shots_prefix="", eval_prefix="")
    return DataSettings(**{**base, **fields})


def test_lines_in_range():
    lines = ["l1", "l2", "l3", "l4"]
    assert lines_in_range(lines, (2, 3), "f") == ["l2", "l3"]
    assert lines_in_range(lines, (3, None), "f") == ["l3", "l4"]
    assert lines_in_range(lines, (), "f") == lines
    with pytest.raises(DataError, match="f has 4 lines; lines 2-5"):
        lines_in_range(lines, (2, 5), "f")


def test_train_pairs_take_the_line_ranges(tmp_path):
    a = write_corpus(tmp_path, "a", 10)
    b = write_corpus(tmp_path, "b", 6, empty=(1, 2))     # lines 1-2 empty: dropped anyway
    settings = data(train_prefixes=(a, b), train_line_ranges=((1, 3), (2, None)))
    pairs = read_train_pairs(settings)
    assert [p.src for p in pairs] == ["de 1", "de 2", "de 3", "de 3", "de 4", "de 5", "de 6"]
    assert [p.tgt for p in pairs][:3] == ["en 1", "en 2", "en 3"]
    assert len(read_train_pairs(data(train_prefixes=(a, b), train_line_ranges=((1, 3), (2, None)),
                                     max_train_pairs=4))) == 4


def test_target_file_lines_follow_the_range(tmp_path):
    a = write_corpus(tmp_path, "a", 10)
    distilled = tmp_path / "a.distilled"
    distilled.write_text("".join(f"self {i}\n" for i in range(1, 11)))
    pairs = read_train_pairs(data(train_prefixes=(a,), train_target_files=(str(distilled),),
                                  train_line_ranges=((8, 10),)))
    assert [(p.src, p.tgt) for p in pairs] == [("de 8", "self 8"), ("de 9", "self 9"),
                                               ("de 10", "self 10")]


def test_a_range_past_the_end_is_refused_naming_the_file(tmp_path):
    a = write_corpus(tmp_path, "a", 10)
    with pytest.raises(TrainingError, match=r"a\.de has 10 lines; lines 5-11"):
        read_train_pairs(data(train_prefixes=(a,), train_line_ranges=((5, 11),)))


@pytest.mark.parametrize("ranges, message", [
    (((1, 2), (1, 2)), "must be empty or one"),
    (((0, 2),), "first line must be an int >= 1"),
    (((3, 2),), "last line must be None or an int >= first"),
    (((1, 2, 3),), "must be \\(first, last\\)"),
    (("1-2",), "must be \\(first, last\\)"),
])
def test_bad_ranges_are_refused(ranges, message):
    with pytest.raises(ValueError, match=message):
        data(train_line_ranges=ranges)


def test_eval_range_and_target_file_checked_in_the_config():
    import importlib
    config = importlib.import_module("configs.tiny").get_config()
    config.data.eval_line_range = (5, 1)
    with pytest.raises(ConfigKeyError, match="eval_line_range: last line"):
        RunSettings.from_config(config)
    config = importlib.import_module("configs.tiny").get_config()
    config.data.eval_prefix = ""
    config.data.eval_target_file = "x.en"
    with pytest.raises(ConfigKeyError, match="eval_target_file needs eval_prefix"):
        RunSettings.from_config(config)


def test_no_reference_split_needs_distilled_rows():
    import importlib
    config = importlib.import_module("configs.tiny").get_config()
    config.data.eval_reference = False          # and no eval_target_file: nothing to validate on
    with pytest.raises(ConfigKeyError, match="eval_reference=False needs eval_target_file"):
        RunSettings.from_config(config)


def test_smollm2_configs_hold_out_the_validation_lines():
    import importlib
    for name in ("linear_smollm2_wmt14", "lstm_conditioned_smollm2_wmt14",
                 "poma_smollm2_wmt14", "lstm_smollm2_wmt14"):
        d = RunSettings.from_config(importlib.import_module(f"configs.{name}").get_config()).data
        newstest = d.train_prefixes.index(d.eval_prefix)
        assert d.train_line_ranges[newstest][1] < d.eval_line_range[0]
        assert d.shots == 2 and d.space_with_target and d.eval_target_file
        assert len(d.train_target_files) == len(d.train_prefixes)


def test_reference_reader_range(tmp_path):
    a = write_corpus(tmp_path, "a", 5)
    assert [p.src for p in read_parallel_text(a, line_range=(4, None)).pairs] == ["de 4", "de 5"]
