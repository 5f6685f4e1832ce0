"""The study command end to end on a 2-step, 2-seed run, and its statistics."""
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from ibtpo_fast import sampling_study, study, study_report

SMOKE = ["train.steps=2", "train.eval_every=1", "data.batch_size=2", "data.val_size=4", "train.eval_k=2"]


def test_two_presets_two_seeds_with_a_timing_pass(tmp_path):
    out = tmp_path / "study"
    args = ["--presets", "ibtpo,grpo", "--seeds", "2", "--first-seed", "5", "--timing", "--out", str(out), "--jobs", "2"]
    assert study.main([*args, "--", *SMOKE]) == 0
    text = (out / "results.md").read_text()
    assert "| ibtpo | 2 |" in text and "| grpo | 2 |" in text and "`ibtpo` minus each other preset" in text
    assert "bootstrap" in text and "| grpo | " in text.split("Paired differences")[1]
    for png in ("accuracy_vs_steps.png", "accuracy_vs_tokens.png", "accuracy_vs_time.png", "training_dynamics.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    data = json.loads((out / "runs.json").read_text())
    assert [(r["preset"], r["seed"]) for r in data["runs"]] == [("ibtpo", 5), ("ibtpo", 6), ("grpo", 5), ("grpo", 6)]
    run = data["runs"][0]
    assert run["code"] and run["config"]["train"]["seed"] == 5 and run["config"]["data"]["seed"] == 5
    assert [e["step"] for e in run["evals"]] == [0, 1, 2] and all(len(e["correct"]) == 4 for e in run["evals"])
    # training seconds are the timing pass's: the same for every seed of a preset
    timing = data["timing"]["ibtpo"]
    assert len(timing) == 2 and run["evals"][-1]["seconds"] == pytest.approx(sum(timing))
    assert data["runs"][1]["evals"][-1]["seconds"] == run["evals"][-1]["seconds"] != run["evals"][-1]["seconds_own"]
    assert np.mean(run["evals"][-1]["correct"]) / 2 == pytest.approx(run["evals"][-1]["metrics"]["val-core/arithmetic/acc/mean@2"])
    # the report regenerates from runs.json alone
    (out / "results.md").unlink()
    assert study.main(["--report", str(out / "runs.json")]) == 0
    assert (out / "results.md").read_text() == text
    stamp = (out / "runs" / "grpo-seed6" / "metrics.jsonl").stat().st_mtime_ns
    assert study.main([*args, "--", *SMOKE]) == 0
    assert (out / "runs" / "grpo-seed6" / "metrics.jsonl").stat().st_mtime_ns == stamp  # finished runs are not rerun


def test_a_run_begun_with_another_config_or_code_is_refused(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["--presets", "grpo", "--seeds", "1", "--out", str(out)]
    assert study.main([*args, "--", *SMOKE]) == 0
    with pytest.raises(SystemExit):
        study.main([*args, "--", *SMOKE[:-1], "train.eval_k=3"])
    assert "another config (train.eval_k: 2 there, 3 asked)" in capsys.readouterr().err
    record = out / "runs" / "grpo-seed0" / study.RUN_RECORD
    record.write_text(json.dumps({**json.loads(record.read_text()), "code": "0" * 16}))
    assert study.main([*args, "--", *SMOKE]) == 0  # a finished run keeps the code it ran, and the report says so
    assert "(code 0000000000000000): 1 runs" not in (out / "results.md").read_text()
    assert "(code 0000000000000000)." in (out / "results.md").read_text()
    metrics = out / "runs" / "grpo-seed0" / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))  # cut short: to be resumed
    with pytest.raises(SystemExit):
        study.main([*args, "--", *SMOKE])
    assert "begun with another code" in capsys.readouterr().err


def test_paired_interval_bootstrap_and_interpolation():
    m, lo, hi = study_report.paired([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])
    assert m == pytest.approx(0.2) and lo == pytest.approx(0.2 - 4.303 * 0.1 / np.sqrt(3)) and hi > m
    evals = [{"step": 0, "tokens": 0.0, "seconds": 0.0, "metrics": {"val-core/x/acc/mean@2": 0.25}, "correct": [0, 1]},
             {"step": 1, "tokens": 20.0, "seconds": 4.0, "metrics": {"val-core/x/acc/mean@2": 0.75}, "correct": [2, 1]}]
    run = study_report.Run("p", 0, evals, {})
    assert study_report.at_cost(run, "val-core/x/acc/mean@2", "tokens", 10.0) == pytest.approx(0.5)  # half way
    assert run.correct_at("seconds", 1.0, k=2) == pytest.approx([0.25, 0.5])
    diff = np.random.default_rng(1).normal(0.1, 0.05, (8, 64))
    lo, hi = study_report.bootstrap(diff, draws=2000)
    assert lo < diff.mean() < hi and hi - lo < 0.05
    assert study_report.bootstrap(np.zeros((3, 5)), draws=10) == (0.0, 0.0)


def test_bad_presets_overrides_and_failed_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--presets", "nope"])
    with pytest.raises(SystemExit):  # fits ibtpo, not grpo: refused before any run starts
        study.main(["--presets", "ibtpo,grpo", "--out", str(tmp_path), "--", "rollout.tree=2,3,1,1"])
    assert not (tmp_path / "runs").exists()
    missing = ["data.task=file", f"data.train_files={tmp_path / 'absent.jsonl'}", "data.reward_fn=reward_fns:exact"]
    assert study.main(["--presets", "grpo", "--seeds", "1", "--out", str(tmp_path), "--", *missing]) == 1
    assert "grpo seed 0 failed" in capsys.readouterr().err


def test_branching_table_sampling_only(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # TorchEngine gives entropies: no surprisal fallback
        assert study.main(["--sampling", "3", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "sampling.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "branching" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == list(sampling_study.BASELINES)
    cells = [r.split(" | ") for r in rows]
    assert [c[1] for c in cells] == ["8.0", "12.0", "12.0", "12.0", "12.0"]  # the specs' trajectories
    assert cells[0][3] == "1.00x" and cells[0][8] == "-"  # G=8 against itself; independent sampling picks nothing
    assert all(0 <= float(c[-1].rstrip(" |")) < 1 for c in cells)  # the local advantage's relative size
    data = json.loads((tmp_path / "sampling.json").read_text())
    ib = data["arms"]["IB tree (4,9,1,1)"]
    assert ib["picks"] == 3 * 8 and len(ib["pick_depths"]) == 24 and ib["config"]["rollout"]["tree"] == "4,9,1,1"
    assert len(data["commit"]) == 40 and (tmp_path / "pick_depth.png").stat().st_size > 1000


def test_candidates_and_the_preregistered_rule(tmp_path):
    """Every candidate is sampled (a candidate equal to a baseline reuses its totals), and --select ranks
    them by the rule of docs/algorithm.md section 9 over workloads."""
    for task in ("arithmetic", "arithmetic_hard"):
        assert study.main(["--sampling", "2", "--candidates", "root,pi", "--out", str(tmp_path / task / "candidates"),
                           "--", f"data.task={task}"]) == 0
    data = json.loads((tmp_path / "arithmetic" / "candidates" / "sampling.json").read_text())
    names = [n for n in data["arms"] if n not in sampling_study.BASELINES]
    assert len(names) == 4 and all(" / mean / " in n and n.endswith(" / shallow") for n in names)
    default = data["arms"]["IB root dropped / mean / product / shallow"]
    assert default["tokens"] == data["arms"]["IB tree (4,9,1,1)"]["tokens"]
    assert default["root_picks"] == 0 and data["arms"]["IB root kept / mean / geomean / shallow"]["root_picks"] > 0
    files = [str(tmp_path / t / "candidates" / "sampling.json") for t in ("arithmetic", "arithmetic_hard")]
    with pytest.raises(ValueError, match="two files sample 'arithmetic'"):
        sampling_study.select([files[0], files[0]])
    assert study.main(["--select", *files, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "selection.md").read_text()
    assert text.count("arithmetic_hard: tokens vs G=8") == 1  # one column group per workload, named by its task
    ranked = [line.split(" | ") for line in text.splitlines() if line.startswith("| IB")]
    assert len(ranked) == 4 and [float(r[1]) for r in ranked] == sorted(float(r[1]) for r in ranked)
    assert f"Chosen: **{ranked[0][0][2:]}**" in text


def test_shortfall_of_the_rule():
    ref = {sampling_study.G8: {"accuracy": 0.40}, sampling_study.G12: {"accuracy": 0.41, "effective": 0.90},
           sampling_study.RANDOM: {"accuracy": 0.42}}
    s, met = sampling_study.shortfall({"tokens_vs_g8": 1.02, "effective": 0.95, "accuracy": 0.45}, ref)
    assert s == 0 and met == [True, True, True]
    s, met = sampling_study.shortfall({"tokens_vs_g8": 1.13, "effective": 0.85, "accuracy": 0.42}, ref)
    assert s == pytest.approx(0.10 + 0.05 + 0.001) and met == [False, False, False]


def test_select_names_a_file_that_is_not_a_sampling_table(tmp_path, capsys):
    bad = tmp_path / "results.json"
    bad.write_text('{"arms": {}}')
    with pytest.raises(SystemExit) as stop:
        study.main(["--select", str(bad), str(tmp_path / "missing.json"), "--out", str(tmp_path)])
    assert stop.value.code == 2 and f"{bad} is not a sampling.json" in capsys.readouterr().err
    assert not (tmp_path / "selection.md").exists()


@pytest.mark.parametrize(("text", "says"), [(None, "cannot read it"), ("{runs", "not JSON"),
                                             ('{"command": "x"}', "not a study's runs.json (missing presets, runs)"),
                                             ("[1]", "not a study's runs.json (missing command, presets, runs)")])
def test_report_names_a_missing_or_malformed_runs_json(tmp_path, capsys, text, says):
    path = tmp_path / "runs.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as stop:
        study.main(["--report", str(path)])
    assert stop.value.code == 2 and f"--report {path}: {says}" in capsys.readouterr().err
    assert not (tmp_path / "results.md").exists()


COMMITTED = sorted((Path(__file__).parents[1] / "docs" / "study" / "confirmatory").glob("*/runs.json"))


def test_a_committed_study_is_present():
    assert COMMITTED, "docs/study/confirmatory/ holds no runs.json"


@pytest.mark.parametrize("runs_json", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_committed_results_regenerate_from_their_runs_json(tmp_path, runs_json):
    shutil.copy(runs_json, tmp_path / "runs.json")
    assert study.main(["--report", str(tmp_path / "runs.json")]) == 0
    assert (tmp_path / "results.md").read_text() == (runs_json.parent / "results.md").read_text()


FINISHED = sorted((Path(__file__).parents[1] / "docs" / "study" / "confirmatory").glob("*/finished-runs/*/*"))


@pytest.mark.parametrize("path", FINISHED, ids=[f"{p.parents[2].name}/{p.parent.name}/{p.name}" for p in FINISHED])
def test_committed_finished_runs_are_whole(path):
    """A study in progress commits its finished runs' records, from which another machine resumes it:
    each is finished, and reads as runs.json keeps a run, every evaluation with every problem's count."""
    preset, seed = path.name.rsplit("-seed", 1)
    config = json.loads((path / study.RUN_RECORD).read_text())["config"]
    assert config["preset"] == preset and config["train"]["seed"] == int(seed)
    assert study.is_finished(path, config["train"]["steps"])
    if path.parent.name == "timing":  # a timing run: every step's seconds, no evaluation
        assert len(study.timing_of(path)) == config["train"]["steps"]
        return
    entry = study.run_entry(path, preset, int(seed), None)
    every, steps = config["train"]["eval_every"], config["train"]["steps"]
    assert [e["step"] for e in entry["evals"]] == [0, *range(every, steps + 1, every)]  # the study's schedule
    assert all(len(e["correct"]) == config["data"]["val_size"] for e in entry["evals"])
