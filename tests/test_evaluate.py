"""`python -m gptk_jax.evaluate` end to end on a tiny random trunk with the real Llama 3
tokenizer and real newstest2014 sentences: greedy and MTP give the same tokens and scores, and the
report files are written; a user's own file pair evaluates the same way; a bad split or path is a
one-line error."""

import json
import os
from pathlib import Path

import jax
import pytest

from conftest import DATA, WMT, read_lines
from gptk_jax import artifacts
from gptk_jax.data.prompts import hypothesis_text, translation_stop_ids
from gptk_jax.llama.checkpoint import save_converted
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.evaluate import main
from gptk_jax.evaluation import resolve_space_with_target
from gptk_jax.heads import HeadConfig, init_head_params, make_head
from gptk_jax.heads.io import save_heads
from gptk_jax.llama.model import init_params
from gptk_jax.tokenizers import Llama3Tokenizer

pytestmark = pytest.mark.slow

CFG = LlamaConfig(vocab_size=128256, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                  rope_theta=10000.0)


@pytest.fixture(scope="module")
def tokenizer():
    return Llama3Tokenizer(artifacts.fetch("llama3_tokenizer_model"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("evaluate")
    params = init_params(CFG, jax.random.PRNGKey(0))
    ckpt = save_converted(root / "tiny-trunk", CFG, params, write_tokenizer=tokenizer.save)
    head_config = HeadConfig(kind="poma", k=3)
    head_params = init_head_params(make_head(head_config, CFG), params, jax.random.PRNGKey(1))
    heads = save_heads(root / "heads", head_config, head_params, CFG, "tiny-trunk")
    return ckpt, heads, root / "report"


def test_stop_ids_and_text(tokenizer):
    stops = translation_stop_ids(tokenizer)
    assert set(tokenizer.stop_ids) <= set(stops)
    assert all(tokenizer.decode([i]).strip() == "" for i in stops if i not in tokenizer.stop_ids)
    assert tokenizer.encode("\n")[0] in stops
    ids = tokenizer.encode(" Hello world.\nde: next line")
    assert hypothesis_text(tokenizer, ids) == "Hello world."


def test_evaluate_end_to_end(folders):
    ckpt, heads, out = folders
    rc = main(["--checkpoint", str(ckpt), "--heads", str(heads), "--split", "newstest2014",
               "--data-root", str(DATA),
               "--max-sentences", "3", "--batch-sizes", "1,2", "--max-new-tokens", "6",
               "--oracle", "--lookup", "--lookup-k", "5", "--continuous", "--no-progress",
               "--bucket", "64", "--output", str(out)])   # 64: one prompt length, fewer compiles
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["all_identical_to_greedy"] and report["scores_identical"]
    methods = ("greedy", "mtp", "lookup", "heads+lookup", "oracle")
    continuous = {f"{m}/b2/continuous" for m in methods if m != "oracle"}   # batch 1: none
    assert set(report["runs"]) == {f"{m}/b{b}" for m in methods for b in (1, 2)} | continuous
    for name in continuous:
        run = report["runs"][name]
        assert run["schedule"] == "continuous" and run["identical_to_greedy"]
        assert run["tokens"] == report["runs"]["greedy/b2"]["tokens"]
    assert report["runs"]["lookup/b2/continuous"]["k"] == 5
    for m, k in (("mtp", 3), ("lookup", 5), ("heads+lookup", 5), ("oracle", 3)):
        assert report["runs"][f"{m}/b1"]["k"] == k
        assert len(report["runs"][f"{m}/b1"]["accepted_histogram"]) == k
    for b in (1, 2):
        oracle = report["runs"][f"oracle/b{b}"]
        assert oracle["accepted_histogram"][:-1] == [0, 0]  # every draft accepted
        assert report["runs"][f"mtp/b{b}"]["tokens"] == report["runs"][f"greedy/b{b}"]["tokens"]
    quality = report["quality"]["mtp/b1"]
    assert quality["bleu_signature"].startswith("nrefs:1|")
    assert "nc:6" in quality["chrf_signature"]
    lines = (out / "translations.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 3
    assert first["source"] == read_lines(DATA / "wmt14-de-en" / "newstest2014.de")[0]
    assert (out / "report.md").read_text().count("| greedy/b") == 3
    wmt = Path(os.path.abspath(WMT))         # the CLI resolves the data root to an absolute path
    assert report["split"] == "newstest2014"
    assert report["test_set"] == {
        "name": "newstest2014", "kind": "files", "source": str(wmt / "newstest2014.de"),
        "reference": str(wmt / "newstest2014.en"), "num_sentences": 3, "src_lang": "de",
        "tgt_lang": "en", "dropped_empty": 0}
    assert f"`{wmt / 'newstest2014.de'}`" in (out / "report.md").read_text()
    assert (out / "acceptance.png").stat().st_size > 1000


def test_evaluate_a_users_own_file_pair_end_to_end(folders, tmp_path, capsys):
    """English sources and German references of the user's own (here: newstest2014's, reversed,
    with a blank line inserted), evaluated en->de; the report names the two files."""
    ckpt, heads, _ = folders
    english = read_lines(WMT / "newstest2014.en")[:3]
    german = read_lines(WMT / "newstest2014.de")[:3]
    source, reference, out = tmp_path / "mine.en", tmp_path / "mine.de", tmp_path / "report"
    source.write_text("\n".join(english[:2] + ["", english[2]]) + "\n", encoding="utf-8")
    reference.write_text("\n".join(german[:2] + ["ignored", german[2]]) + "\n", encoding="utf-8")
    rc = main(["--checkpoint", str(ckpt), "--heads", str(heads), "--source", str(source),
               "--reference", str(reference), "--src-lang", "en", "--tgt-lang", "de",
               "--batch-sizes", "2", "--max-new-tokens", "4", "--no-progress",
               "--output", str(out)])
    assert rc == 0
    assert "3 sentences of " in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["split"] is None
    assert report["test_set"] == {
        "name": f"{source} + {reference}", "kind": "pair", "source": str(source),
        "reference": str(reference), "num_sentences": 3, "src_lang": "en", "tgt_lang": "de",
        "dropped_empty": 1}
    assert report["all_identical_to_greedy"] and set(report["runs"]) == {"greedy/b2", "mtp/b2"}
    rows = [json.loads(l) for l in (out / "translations.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == english and [r["reference"] for r in rows] == german
    md = (out / "report.md").read_text()
    assert f"`{source}` / `{reference}`" in md and "3 sentences en→de" in md
    assert "pairs dropped for an empty side: 1" in md


def test_a_bad_split_or_path_is_a_one_line_error(folders, tmp_path, capsys):
    ckpt, heads, _ = folders
    base = ["--checkpoint", str(ckpt), "--heads", str(heads), "--output", str(tmp_path / "r")]
    real = str(WMT / "newstest2014.en")
    cases = {"'wmt99'": ["--split", "wmt99"],
             str(tmp_path / "nope.de"): ["--source", str(tmp_path / "nope.de"),
                                         "--reference", real],
             str(tmp_path / "wmt14-de-en" / "newstest2013.de"): ["--split", "newstest2013",
                                                                 "--data-root", str(tmp_path)]}
    for named, flags in cases.items():
        assert main(base + flags) == 2, flags
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and named in err, err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):     # argparse: half a pair
        main(base + ["--source", real])
    assert "--source and --reference go together" in capsys.readouterr().err


def test_a_sacrebleu_name_reads_the_data_roots_cache(monkeypatch):
    """Without $SACREBLEU the CLI points sacreBLEU at DATA_ROOT/sacrebleu; the pairs are the
    cached files' lines."""
    from gptk_jax.evaluate import parse_args
    from gptk_jax.evaluation.pipeline import load_eval_set
    monkeypatch.delenv("SACREBLEU", raising=False)
    cfg = parse_args(["--checkpoint", "unused", "--lookup", "--k", "3", "--split", "wmt13",
                      "--data-root", str(DATA), "--max-sentences", "2", "--output", "unused"])
    assert cfg.sacrebleu_cache == os.path.abspath(DATA / "sacrebleu")
    test_set = load_eval_set(cfg)
    cached = DATA / "sacrebleu" / "wmt13"
    assert test_set.pairs[0].src == read_lines(cached / "wmt13.de-en.src")[0]
    assert test_set.pairs[1].tgt == read_lines(cached / "wmt13.de-en.ref")[1]
    assert test_set.describe()["kind"] == "sacrebleu" and len(test_set) == 2


def test_generate_cli_mtp_equals_greedy(folders, tmp_path):
    from gptk_jax.generate import main as generate_main
    ckpt, heads, _ = folders
    records = {}
    for decoding in ("greedy", "mtp", "lookup"):
        out = tmp_path / f"{decoding}.jsonl"
        extra = {"greedy": [], "mtp": ["--heads", str(heads)],
                 "lookup": ["--heads", str(heads), "--k", "5"]}[decoding]
        assert generate_main(["--checkpoint", str(ckpt), "--prompt", "Guten Tag", "--prompt",
                              "Ein längerer Satz, der mehr Tokens hat.", "--batch-size", "2",
                              "--max-new-tokens", "5", "--decoding", decoding, "--quiet",
                              "--output-json", str(out), *extra]) == 0
        records[decoding] = [json.loads(l) for l in out.read_text().splitlines()]
    for decoding in ("mtp", "lookup"):
        assert [r["generated_ids"] for r in records[decoding]] == \
            [r["generated_ids"] for r in records["greedy"]]
    for r in records["mtp"] + records["lookup"]:
        assert sum(r["emitted_per_step"]) == r["num_generated"] - 1
        assert len(r["accepted_per_step"]) == r["verify_steps"]
    # heads are refused for a K they were not trained for
    assert generate_main(["--checkpoint", str(ckpt), "--prompt", "x", "--max-new-tokens", "2",
                          "--decoding", "mtp", "--heads", str(heads), "--k", "4"]) == 2


def test_prompt_boundary_follows_the_heads_unless_the_flag_says_otherwise(capsys):
    trained = {"config": {"data": {"space_with_target": True}}}
    assert resolve_space_with_target(None, trained) is True          # heads.json decides
    assert resolve_space_with_target(None, {"config": {}}) is False  # nothing recorded
    assert resolve_space_with_target(None, None) is False            # no heads
    assert resolve_space_with_target(True, None) is True
    assert "warning" not in capsys.readouterr().out
    assert resolve_space_with_target(False, trained) is False        # the flag wins, with a warning
    assert "trained with space_with_target=True" in capsys.readouterr().out


def _small_eval(ckpt, heads, out, *extra):
    return ["--checkpoint", str(ckpt), "--heads", str(heads), "--split", "newstest2014",
            "--data-root", str(DATA), "--max-sentences", "2", "--no-progress",
            "--bucket", "64", "--output", str(out), *extra]   # both prompts in one length


def test_runs_are_saved_as_they_finish_and_a_rerun_reuses_them(folders, tmp_path, capsys,
                                                               monkeypatch):
    from gptk_jax.evaluation.decode import Decoding

    ckpt, heads, _ = folders
    out = tmp_path / "report"
    argv = _small_eval(ckpt, heads, out, "--batch-sizes", "1,2", "--max-new-tokens", "3",
                       "--lookup", "--continuous")
    assert main(argv) == 0
    first = json.loads((out / "report.json").read_text())
    assert first["reused_runs"] == []
    assert sorted(p.name for p in (out / "runs").iterdir()) == \
        sorted(name.replace("/", "_") + ".json" for name in first["runs"])
    translations = (out / "translations.jsonl").read_text()
    capsys.readouterr()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although every run was on disk with the same settings")
    monkeypatch.setattr(Decoding, "batch", no_decoding)
    monkeypatch.setattr(Decoding, "continuous", no_decoding)
    assert main(argv) == 0
    second = json.loads((out / "report.json").read_text())
    assert sorted(second["reused_runs"]) == sorted(first["runs"])
    for name, run in first["runs"].items():
        assert second["runs"][name]["tokens"] == run["tokens"] and second["runs"][name]["reused"]
    assert (out / "translations.jsonl").read_text() == translations
    monkeypatch.undo()

    capsys.readouterr()
    # one stored run's settings changed is enough: batch 2 only, no lookup or continuous runs
    changed = [a for a in argv if a not in ("--lookup", "--continuous")]
    changed[changed.index("--max-new-tokens") + 1] = "4"
    changed[changed.index("--batch-sizes") + 1] = "2"
    assert main(changed) == 0
    printed = capsys.readouterr().out
    third = json.loads((out / "report.json").read_text())
    assert third["reused_runs"] == [] and third["max_new_tokens"] == 4
    assert "settings changed" in printed and "max_new_tokens" in printed


def test_finished_runs_survive_a_failure_and_no_report_is_written(folders, tmp_path,
                                                                  monkeypatch):
    from gptk_jax.evaluation.decode import Decoding

    ckpt, heads, _ = folders
    out = tmp_path / "report"

    def machine_gone(*args, **kwargs):
        raise RuntimeError("the machine went away")
    monkeypatch.setattr(Decoding, "continuous", machine_gone)
    with pytest.raises(RuntimeError):
        main(_small_eval(ckpt, heads, out, "--batch-sizes", "2", "--max-new-tokens", "2",
                         "--continuous"))
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["greedy_b2.json", "mtp_b2.json"]
    saved = json.loads((out / "runs" / "mtp_b2.json").read_text())
    assert saved["run"]["k"] == 3 and len(saved["tokens"]) == 2 and saved["fingerprint"]
    assert not (out / "report.json").exists() and not (out / "translations.jsonl").exists()


def test_heads_prompt_record_sets_the_boundary_and_a_difference_warns(folders, tmp_path,
                                                                       capsys):
    """heads.json's metadata["prompt_format"] (target prefix ' ', no BOS) decides the boundary;
    Llama 3's tokenizer rule (BOS) differs from it: a warning names bos; --no-bos agrees."""
    from gptk_jax.data.prompts import PromptFormat, prompt_record
    from gptk_jax.heads.io import load_heads

    ckpt, heads, _ = folders
    old = load_heads(heads)
    recorded = prompt_record(PromptFormat.for_languages("de", "en", space_with_target=True),
                             bos=False)
    new_heads = save_heads(tmp_path / "heads", old.head_config, old.params, CFG, "tiny-trunk",
                           metadata={"prompt_format": recorded})
    flags = ("--batch-sizes", "1", "--max-new-tokens", "2")
    assert main(_small_eval(ckpt, new_heads, tmp_path / "r1", *flags)) == 0
    printed = capsys.readouterr().out
    assert "space_with_target=True (as the heads were trained" in printed
    warnings = [l for l in printed.splitlines() if l.startswith("warning: prompt format")]
    assert len(warnings) == 1 and "differs in bos" in warnings[0] and str(new_heads) in \
        warnings[0]
    report = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert report["prompt_format"]["bos"] is True and report["prompt_format"]["target_prefix"] \
        == " "
    assert main(_small_eval(ckpt, new_heads, tmp_path / "r2", *flags, "--no-bos")) == 0
    assert "warning: prompt format" not in capsys.readouterr().out
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["prompt_format"]["bos"] \
        is False


def test_only_runs_the_named_methods_and_names_bad_ones(folders, tmp_path, capsys):
    """--only keeps the named drafting methods of those the flags ask for (greedy always runs);
    an unknown name or one the flags do not ask for is a one-line error naming the choices."""
    ckpt, heads, _ = folders
    out = tmp_path / "report"
    assert main(_small_eval(ckpt, heads, out, "--batch-sizes", "1", "--max-new-tokens", "3",
                            "--lookup", "--only", "heads+lookup")) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["runs"]) == {"greedy/b1", "heads+lookup/b1"}
    assert report["runs"]["heads+lookup/b1"]["identical_to_greedy"]
    for only, words in (("mtp,beam", "choose from mtp, lookup, heads+lookup, heads+lookup-tree"),
                        ("heads+lookup-tree", "not asked for")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(_small_eval(ckpt, heads, tmp_path / "other", "--lookup", "--only", only))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--only" in err and words in err
