"""The study command end to end on a 2-step, 2-seed run, and its statistics."""
import json
import warnings

import numpy as np
import pytest

from ibtpo_fast import sampling_study, study

SMOKE = ["train.steps=2", "train.eval_every=1", "data.batch_size=2", "data.val_size=4", "train.eval_k=2"]


def test_two_presets_two_seeds(tmp_path):
    out = tmp_path / "study"
    assert study.main(["--presets", "ibtpo,grpo", "--seeds", "2", "--out", str(out), "--jobs", "2", "--", *SMOKE]) == 0
    text = (out / "results.md").read_text()
    assert "| ibtpo | 2 |" in text and "| grpo | 2 |" in text and "Paired differences from `grpo`" in text
    for png in ("accuracy_vs_tokens.png", "accuracy_vs_time.png", "training_dynamics.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert [r["step"] for r in summary["ibtpo"]] == [2, 2]
    stamp = (out / "runs" / "grpo-seed1" / "metrics.jsonl").stat().st_mtime_ns
    assert study.main(["--presets", "ibtpo,grpo", "--seeds", "2", "--out", str(out), "--", *SMOKE]) == 0
    assert (out / "runs" / "grpo-seed1" / "metrics.jsonl").stat().st_mtime_ns == stamp  # finished runs are not rerun


def test_paired_interval_and_token_interpolation():
    m, lo, hi = study.paired([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])
    assert m == pytest.approx(0.2) and lo == pytest.approx(0.2 - 4.303 * 0.1 / np.sqrt(3)) and hi > m
    run = study.Run("p", 0, [{"step": 0, "val-core/x/acc/mean@2": 0.2},
                             {"step": 1, "tree/generated_tokens": 10.0, "val-core/x/acc/mean@2": 0.6}], batch_size=2)
    assert study.at_tokens(run, "val-core/x/acc/mean@2", 10.0) == pytest.approx(0.4)  # half way to 20 tokens


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
