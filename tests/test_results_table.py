"""docs/results.md / results.json rendering (gptk_jax/evaluation/results_table.py) from hand-made
run folders: drafter names, the numbers carried over unchanged, a partial table that says so."""

import json
import os

from gptk_jax.evaluation.results_table import collect, markdown, pieces_markdown, results_json


def _run(tau=None, speedup=None, k=4, identical=True, acc=None):
    run = {"tokens_per_second": 30.0, "identical_to_greedy": identical}
    if tau is not None:
        run.update(tau=tau, speedup=speedup, k=k, per_offset_acceptance=acc or {"2": 0.5})
    return run


def _write_family(root, family, runs, trained=True):
    run = root / family
    (run / "heads").mkdir(parents=True)
    if trained:
        (run / "heads" / "heads.json").write_text(json.dumps(
            {"head_config": {"recipe": "conditioned" if family == "lstm" else "default"}}))
    (run / "train.json").write_text(json.dumps({"wall_seconds": 600.0}))
    (run / "metrics.jsonl").write_text(json.dumps({"split": "setup", "step": 0,
                                                   "train_target_tokens": 1234}) + "\n")
    if runs is not None:
        (run / "eval").mkdir()
        (run / "eval" / "report.json").write_text(json.dumps(
            {"num_sentences": 200, "shots": 2, "test_set": {"name": "newstest2014"},
             "runs": runs}))


def test_entries_names_and_numbers(tmp_path):
    _write_family(tmp_path, "linear", {
        "greedy/b1": _run(), "mtp/b1": _run(1.5, 1.1, acc={"2": 0.4, "3": 0.3, "4": 0.2}),
        "heads+lookup/b1": _run(2.4, 1.4), "lookup/b1": _run(2.0, 1.2),
        "oracle/b1": _run(3.9, 1.9), "greedy/b8": _run(), "mtp/b8": _run(1.5, 0.99),
        "greedy/b8/continuous": _run(), "mtp/b8/continuous": _run(1.5, 1.02)})
    _write_family(tmp_path, "lstm", {"greedy/b1": _run(), "mtp/b1": _run(1.7, 1.2),
                                     "lookup/b1": _run(9.0, 9.0)})
    collected = collect(tmp_path, ["linear", "lstm"])
    names = [e["drafter"] for e in collected["entries"]]
    # lookup comes from the first family that ran it, once
    assert names == ["linear", "linear+lookup", "lookup", "oracle", "lstm"]
    linear = collected["entries"][0]
    assert (linear["tau_k4"], linear["speedup_b1"], linear["speedup_b8"],
            linear["speedup_b8_continuous"]) == (1.5, 1.1, 0.99, 1.02)
    assert linear["recipe"] == "default" and linear["train_minutes"] == 10.0
    assert linear["train_positions"] == 1234
    assert linear["prompt_format"] == "2 shots"           # no prompt record in this report
    assert collected["entries"][2]["train_minutes"] is None          # lookup is not trained
    assert collected["entries"][4]["recipe"] == "conditioned"
    text = markdown(collected)
    assert ("| linear | default | 1.50 | 1.10× | 0.99× | 1.02× | 0.40, 0.30, 0.20 | "
            "fixed / fixed | – / – | yes |") in text
    assert "Partial" not in text
    assert results_json(collected, "x")["partial"] is False


def test_partial_table_names_what_is_missing(tmp_path):
    _write_family(tmp_path, "linear", {"greedy/b1": _run(), "mtp/b1": _run(1.5, 1.1)})
    _write_family(tmp_path, "poma", None)                  # trained, not evaluated
    _write_family(tmp_path, "lstm", None, trained=False)   # not trained
    collected = collect(tmp_path, ["linear", "poma", "lstm"])
    assert collected["missing"] == [
        "poma: evaluation not finished (no eval/ or eval-*/report.json)",
        "lstm: training not finished (no heads/heads.json)"]
    text = markdown(collected)
    assert "**Partial**" in text and "- poma: evaluation not finished" in text
    summary = results_json(collected, "python bench/results.py")
    assert summary["partial"] is True and [r["drafter"] for r in summary["runs"]] == ["linear"]
    assert summary["runs"][0]["identical_to_greedy"] is True


def test_a_run_differing_from_greedy_is_flagged(tmp_path):
    _write_family(tmp_path, "linear", {"greedy/b1": _run(),
                                       "mtp/b1": _run(1.5, 1.1, identical=False)})
    text = markdown(collect(tmp_path, ["linear"]))
    assert "| **no** |" in text


def test_w_chosen_per_step_is_shown(tmp_path):
    auto = dict(_run(1.4, 1.05), chosen_w_histogram=[0, 5, 1, 0, 2],
                tokens_per_step_mode="auto", greedy_step_cost=0.8)
    _write_family(tmp_path, "linear", {"greedy/b1": _run(), "mtp/b1": auto,
                                       "greedy/b8": _run(), "mtp/b8": _run(1.4, 0.99)})
    collected = collect(tmp_path, ["linear"])
    assert collected["entries"][0]["runs"]["b1"]["chosen_w_histogram"] == [0, 5, 1, 0, 2]
    # drafting: a W = 1 step with drafting costs 1 / 0.8 of greedy's, 25 % more
    assert "| 5:1:0:2 / fixed | 25 % / – |" in markdown(collected)


def _write_piece(root, family, name, runs, sentences=200):
    (root / family / name).mkdir()
    (root / family / name / "report.json").write_text(json.dumps(
        {"num_sentences": sentences, "shots": 2, "test_set": {"name": "newstest2014"},
         "runs": runs, "command": f"python -m gptk_jax.evaluate --batch-sizes {name[-1]}"}))


def test_evaluation_pieces_are_merged_and_a_mismatched_piece_is_named(tmp_path):
    # eval/ ran the heads at batch 1; eval-b8/ batch 8 and eval-lookup/ the lookup runs later;
    # eval-lookup's mtp/b1 is a second measurement of a key already read: the newer one wins,
    # whatever the folders' names (eval-again/ sorts before eval-b8/ but is written last)
    _write_family(tmp_path, "linear", {"greedy/b1": _run(), "mtp/b1": _run(1.5, 1.1)})
    _write_piece(tmp_path, "linear", "eval-b8", {"greedy/b8": _run(), "mtp/b8": _run(1.4, 0.99)})
    _write_piece(tmp_path, "linear", "eval-lookup", {"mtp/b1": _run(9.0, 9.0),
                                                     "lookup/b1": _run(2.0, 1.2)})
    _write_piece(tmp_path, "linear", "eval-other", {"oracle/b1": _run(3.9, 1.9)}, sentences=50)
    _write_piece(tmp_path, "linear", "eval-again", {"mtp/b1": _run(1.6, 1.15)})
    again = tmp_path / "linear" / "eval-again" / "report.json"
    os.utime(again, ns=(again.stat().st_atime_ns, again.stat().st_mtime_ns + 10**10))
    collected = collect(tmp_path, ["linear"])
    by_name = {e["drafter"]: e for e in collected["entries"]}
    assert sorted(by_name) == ["linear", "lookup"]                  # the 50-sentence oracle: out
    assert (by_name["linear"]["speedup_b1"], by_name["linear"]["speedup_b8"]) == (1.15, 0.99)
    assert by_name["linear"]["tau_k4"] == 1.6
    assert by_name["lookup"]["speedup_b1"] == 1.2
    assert collected["missing"] == ["linear: eval-other: other sentences or prompts than eval"]
    assert "**Partial**" in markdown(collected)
    assert [p["folder"] for p in collected["pieces"]["linear"]] == ["eval", "eval-again",
                                                                   "eval-b8", "eval-lookup"]
    assert pieces_markdown(collected)[2] == \
        "- linear/eval-b8: `python -m gptk_jax.evaluate --batch-sizes 8`"
    assert pieces_markdown(collected)[0].endswith("(command not recorded in this report)")


def _results_script():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "bench" / "results.py"
    spec = importlib.util.spec_from_file_location("bench_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_results_evaluates_one_piece_per_batch_size(tmp_path):
    results = _results_script()
    args = results.parse_args(["--runs-dir", str(tmp_path), "--batch-sizes", "1,8",
                               "--families", "linear,lstm"])
    assert args.batch_sizes == [1, 8] and args.interleave and args.choose_width
    first = results.eval_command(args, "linear", True, 8)
    assert first[first.index("--batch-sizes") + 1] == "8"
    assert first[first.index("--output") + 1] == str(tmp_path / "linear" / "eval-b8")
    assert "--oracle" in first and "--interleave" in first and "--tree" in first
    assert "--oracle" not in results.eval_command(args, "lstm", False, 1)
    run = tmp_path / "linear"
    assert not results.evaluated(run, 1)
    _write_piece_at(run / "eval-b1")
    assert results.evaluated(run, 1) and not results.evaluated(run, 8)
    _write_piece_at(run / "eval")                  # a one-piece evaluation of before: all done
    assert results.evaluated(run, 8)


def _write_piece_at(folder):
    folder.mkdir(parents=True)
    (folder / "report.json").write_text("{}")
