"""`python -m gptk_jax.evaluate` end to end on a tiny random trunk with the real Llama 3
tokenizer and real newstest2014 sentences: greedy and MTP give the same tokens and scores, and the
report files are written."""

import json

import jax
import pytest

from gptk_jax import artifacts
from gptk_jax.llama.checkpoint import save_converted
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.evaluate import hypothesis_text, main, resolve_space_with_target, translation_stop_ids
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
               "--max-sentences", "3", "--batch-sizes", "1,2", "--max-new-tokens", "6",
               "--oracle", "--lookup", "--lookup-k", "5", "--continuous", "--no-progress",
               "--output", str(out)])
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
    from conftest import DATA, read_lines
    assert len(lines) == 3
    assert first["source"] == read_lines(DATA / "wmt14-de-en" / "newstest2014.de")[0]
    assert (out / "report.md").read_text().count("| greedy/b") == 3
    assert (out / "acceptance.png").stat().st_size > 1000


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
