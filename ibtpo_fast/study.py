"""`python -m ibtpo_fast.study --presets ibtpo,grpo --seeds 8 [--first-seed N] [--timing] [--out DIR] [-- key=value ...]`

Trains every preset x seed on the same prompts (`train.seed` = `data.seed` = the seed), each run a
`python -m ibtpo_fast.train` process (several at once where the machine has cores; an interrupted
study resumes where each run stopped, and refuses a run that other code or another config began).
`--timing` then runs each preset's first seed again, alone, for training times free of neighbours.
Writes `runs.json` (every run's commit, config, training figures and per-problem evaluations), and
from it `results.md` and `plots/*.png` in `--out`: the presets at equal steps, generated tokens and
training time, and the first preset's paired differences from each other one
(`python -m ibtpo_fast.study --report DIR/runs.json` regenerates them). The protocol this
implements is docs/study.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ibtpo_fast import sampling_study, study_report
from ibtpo_fast.config import PRESETS
from ibtpo_fast.errors import UserError, user_errors_end_cleanly
from ibtpo_fast.provenance import provenance
from ibtpo_fast.runlog import EVALS_FILE, read_metrics
from ibtpo_fast.study_report import STEP_SERIES

RUN_RECORD = "study_run.json"  # in each run's directory: the code and config it was begun with


def run_dir(out: Path, preset: str, seed: int) -> Path:
    return out / "runs" / f"{preset}-seed{seed}"


def timing_dir(out: Path, preset: str, seed: int) -> Path:
    return out / "timing" / f"{preset}-seed{seed}"


def train_args(path: Path, preset: str, seed: int, overrides: Sequence[str]) -> list[str]:
    return [f"preset={preset}", f"train.seed={seed}", f"data.seed={seed}", f"run.out_dir={path.parent}",
            f"run.name={path.name}", "run.progress=off", *overrides]


def is_finished(path: Path, steps: int) -> bool:
    metrics = path / "metrics.jsonl"
    return metrics.is_file() and any(r.get("step") == steps for r in read_metrics(metrics))


def check_provenance(path: Path, config: dict[str, Any], finished: bool) -> dict[str, Any]:
    """The run's record of what it runs (code and config), written before its first start. A run begun
    with another config is refused; so is resuming one that other code began (a finished run keeps
    the code it ran, which runs.json and the report name)."""
    record_path = path / RUN_RECORD
    want = {**provenance(), "config": config}
    if record_path.is_file():
        have = json.loads(record_path.read_text())
        changed = [key for key in ("code", "config") if have.get(key) != want[key] and (key == "config" or not finished)]
        if changed:
            detail = _config_difference(have.get("config") or {}, config) if "config" in changed else ""
            raise UserError(f"{path} holds a run {'begun' if not finished else 'made'} with another {' and '.join(changed)}"
                            f"{detail} (recorded at commit {have.get('commit') or 'unknown'}); use another --out, "
                            "or delete that run to start it again")
        return have
    path.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(want, indent=1))
    return want


def _config_difference(have: dict[str, Any], want: dict[str, Any], prefix: str = "") -> str:
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _config_difference(a, b, f"{prefix}{key}.")
            if inner:
                return inner
        elif a != b:
            return f" ({prefix}{key}: {a!r} there, {b!r} asked)"
    return ""


def launch(path: Path, preset: str, seed: int, overrides: Sequence[str], threads: int) -> None:
    """One training run, resumed from its last checkpoint if it was cut short; its output in `train.log`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with (path / "train.log").open("a") as log:
        proc = subprocess.run([sys.executable, "-m", "ibtpo_fast.train", *train_args(path, preset, seed, overrides)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run {preset} seed {seed} failed (exit {proc.returncode}); see {path / 'train.log'}")


# ---------------------------------------------------------------- runs.json


def run_entry(path: Path, preset: str, seed: int, timing: list[float] | None) -> dict[str, Any]:
    """A finished run as runs.json keeps it. Training seconds are the timing pass's (`timing`: its
    `timing/step` by step) when there is one, the run's own besides."""
    record = json.loads((path / RUN_RECORD).read_text())
    records = read_metrics(path / "metrics.jsonl")
    train = [r for r in records if r["step"] > 0]
    batch = int(record["config"]["data"]["batch_size"])
    tokens = np.cumsum([0.0] + [r["tree/generated_tokens"] * batch for r in train])
    own = np.cumsum([0.0] + [r.get("timing/step", 0.0) for r in train])
    seconds = np.cumsum([0.0] + list(timing)) if timing is not None else own
    correct = {e["step"]: e["correct"] for e in read_metrics(path / EVALS_FILE)}
    evals = [{"step": r["step"], "tokens": float(tokens[r["step"]]), "seconds": float(seconds[r["step"]]),
              "seconds_own": float(own[r["step"]]), "metrics": {k: v for k, v in r.items() if k.startswith("val-core/")},
              "correct": correct[r["step"]]}
             for r in records if any(k.startswith("val-core/") for k in r)]
    return {"preset": preset, "seed": seed, **record, "evals": evals,
            "steps": {key: [r.get(key) for r in train] for key in STEP_SERIES}}


def timing_of(path: Path) -> list[float]:
    return [r["timing/step"] for r in read_metrics(path / "metrics.jsonl") if r["step"] > 0]


def read_runs(runs_json: Path) -> dict[str, Any]:
    """A study's runs.json, or a UserError naming the file and what is wrong with it."""
    try:
        data = json.loads(runs_json.read_text())
    except OSError as e:
        raise UserError(f"--report {runs_json}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--report {runs_json}: not JSON ({e}); give the runs.json a study wrote") from None
    missing = [k for k in ("command", "presets", "runs") if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"--report {runs_json}: not a study's runs.json (missing {', '.join(missing)})")
    return data


def write_report(runs_json: Path) -> str:
    """results.md and plots/ beside `runs_json`, from it alone."""
    data = read_runs(runs_json)
    groups = study_report.by_preset(data)
    text = f"`{data['command']}`\n\n{study_report.report(groups, study_report.codes(data))}"
    (runs_json.parent / "results.md").write_text(text)
    study_report.plot(groups, runs_json.parent / "plots")
    return text


# ---------------------------------------------------------------- command


def _args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m ibtpo_fast.study", description=__doc__.splitlines()[2])
    ap.add_argument("--presets", default="ibtpo,grpo", help="comma-separated presets; the first is compared with each other")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per preset: FIRST_SEED .. FIRST_SEED + N - 1")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--timing", action="store_true",
                    help="after the runs, each preset's first seed again, alone: the training times the report uses")
    ap.add_argument("--report", metavar="RUNS_JSON", help="instead of training: results.md and plots/ from a runs.json")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1) // 2), help="runs at once")
    ap.add_argument("--sampling", type=int, default=0, metavar="N",
                    help="instead of training: the branching strategies on N problems, sampling only")
    ap.add_argument("--candidates", nargs="?", const="root,norm,pi,tie", default="", metavar="CHOICES",
                    help="with --sampling: also every reconstruction of these open choices of the IB tree "
                         "(default: root,norm,pi,tie)")
    ap.add_argument("--refine", default="", metavar="OVERRIDES",
                    help="with --sampling: the stage-1 winner (its overrides, space-separated) and its refinements")
    ap.add_argument("--select", nargs="+", metavar="SAMPLING_JSON",
                    help="instead of training: the pre-registered rule over candidates' sampling.json files")
    args = ap.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        ap.error(f"--presets: unknown {unknown}; choose from {', '.join(PRESETS)}")
    if args.seeds < 1 or args.jobs < 1 or args.sampling < 0 or args.first_seed < 0:
        ap.error("--seeds and --jobs must be >= 1, --sampling and --first-seed >= 0")
    args.presets = presets
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = _args(argv)
    out = Path(args.out)
    command = f"python -m ibtpo_fast.study {' '.join(sys.argv[1:] if argv is None else argv)}"
    if args.select:
        with user_errors_end_cleanly():
            text = sampling_study.select(args.select)
        return _write(out / "selection.md", command, text)
    if args.sampling:
        out.mkdir(parents=True, exist_ok=True)
        with user_errors_end_cleanly():
            data = sampling_study.run(args.sampling, overrides, [c for c in args.candidates.split(',') if c],
                                       args.refine.split(), command, cache=out / "sampling.cache.json")
        (out / "sampling.json").write_text(json.dumps(data, indent=1))
        sampling_study.plot_pick_depth(data, out / "pick_depth.png")
        return _write(out / "sampling.md", command, sampling_study.table(data))
    if args.report:
        with user_errors_end_cleanly():
            print(write_report(Path(args.report)))
        return 0
    with user_errors_end_cleanly():
        return train_study(args, overrides, out, command)


def train_study(args: argparse.Namespace, overrides: list[str], out: Path, command: str) -> int:
    """The study's runs (resumed where they stopped), its timing pass, runs.json and the report."""
    from ibtpo_fast.config import load_config, to_dict  # a bad override fails here, before any run starts

    seeds = range(args.first_seed, args.first_seed + args.seeds)
    configs = {(p, s): to_dict(load_config(train_args(run_dir(out, p, s), p, s, overrides)))
               for p in args.presets for s in seeds}
    steps = next(iter(configs.values()))["train"]["steps"]
    finished = {key: is_finished(run_dir(out, *key), steps) for key in configs}
    for (p, s), config in configs.items():  # all refusals before anything runs
        check_provenance(run_dir(out, p, s), config, finished[p, s])
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    todo = [(run_dir(out, p, s), p, s, overrides) for p, s in configs if not finished[p, s]]
    if _run_all(todo, args.jobs, threads):
        return 1
    timing = None
    if args.timing:  # one at a time, with the study's thread count: no neighbours
        timed = [(timing_dir(out, p, args.first_seed), p, args.first_seed, [*overrides, "train.eval_every=0"])
                 for p in args.presets]
        done = [is_finished(path, steps) for path, *_ in timed]
        for (path, p, s, o), fin in zip(timed, done):
            check_provenance(path, to_dict(load_config(train_args(path, p, s, o))), fin)
        if _run_all([t for t, fin in zip(timed, done) if not fin], 1, threads):
            return 1
        timing = {p: timing_of(path) for path, p, _, _ in timed}
    runs = [run_entry(run_dir(out, p, s), p, s, timing[p] if timing else None) for p, s in configs]
    data = {"command": command, "presets": args.presets, "seeds": list(seeds), "timing": timing, "runs": runs}
    (out / "runs.json").write_text(json.dumps(data, separators=(",", ":")))
    print(write_report(out / "runs.json"))
    return 0


def _run_all(todo: list[tuple[Path, str, int, list[str]]], jobs: int, threads: int) -> bool:
    """Run `todo` `jobs` at a time; True when any failed (the finished ones are kept: the next call runs the rest)."""
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(launch, path, p, s, o, threads) for path, p, s, o in todo]
        failed = [str(e) for e in (f.exception() for f in futures) if e is not None]
    print("\n".join(f"study: {msg}" for msg in failed), file=sys.stderr, end="\n" if failed else "")
    return bool(failed)


def _write(path: Path, command: str, text: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"`{command}`\n\n{text}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
