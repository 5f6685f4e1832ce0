"""`python -m ibtpo_fast.study --presets ibtpo,grpo --seeds 8 [--out runs/study] [-- key=value ...]`

Trains every preset x seed on the same prompts (`train.seed` = `data.seed` = the seed), each run a
`python -m ibtpo_fast.train` process (several at once where the machine has cores; an interrupted
study resumes where each run stopped), then compares the presets at fixed steps and at fixed
generated-token budgets: mean and standard deviation over seeds, and each preset's paired difference
from the baseline with a 95% confidence interval. Writes `results.md` and `plots/*.png` in `--out`.
The protocol this implements is docs/study.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ibtpo_fast import sampling_study
from ibtpo_fast.config import PRESETS
from ibtpo_fast.errors import user_errors_end_cleanly
from ibtpo_fast.runlog import read_metrics

TOKEN_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # checkpoints, as shares of the smallest final token count of any run
# Two-sided 95% quantiles of Student's t by degrees of freedom (the normal's beyond the table).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


@dataclass
class Run:
    preset: str
    seed: int
    records: list[dict]
    batch_size: int

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if any(k.startswith("val-core/") for k in r)]

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(steps, generated tokens so far, training seconds so far, metric) at each evaluation."""
        train = [r for r in self.records if r["step"] > 0]
        tokens = np.cumsum([0.0] + [r["tree/generated_tokens"] * self.batch_size for r in train])
        seconds = np.cumsum([0.0] + [r.get("timing/step", 0.0) for r in train])
        steps = np.array([r["step"] for r in self.evals])
        return steps, tokens[steps], seconds[steps], np.array([r[metric] for r in self.evals])


def run_dir(out: Path, preset: str, seed: int) -> Path:
    return out / "runs" / f"{preset}-seed{seed}"


def train_args(out: Path, preset: str, seed: int, overrides: Sequence[str]) -> list[str]:
    return [f"preset={preset}", f"train.seed={seed}", f"data.seed={seed}", f"run.out_dir={out / 'runs'}",
            f"run.name={preset}-seed{seed}", "run.progress=off", *overrides]


def is_finished(path: Path, steps: int) -> bool:
    metrics = path / "metrics.jsonl"
    return metrics.is_file() and any(r.get("step") == steps and any(k.startswith("val-core/") for k in r)
                                     for r in read_metrics(metrics))


def launch(out: Path, preset: str, seed: int, overrides: Sequence[str], threads: int) -> None:
    """One training run, resumed from its last checkpoint if it was cut short; its output in `train.log`."""
    path = run_dir(out, preset, seed)
    path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with (path / "train.log").open("a") as log:
        proc = subprocess.run([sys.executable, "-m", "ibtpo_fast.train", *train_args(out, preset, seed, overrides)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run {preset} seed {seed} failed (exit {proc.returncode}); see {path / 'train.log'}")


def load_run(out: Path, preset: str, seed: int) -> Run:
    path = run_dir(out, preset, seed)
    config = yaml.safe_load((path / "config.yaml").read_text())
    return Run(preset, seed, read_metrics(path / "metrics.jsonl"), int(config["data"]["batch_size"]))


# ---------------------------------------------------------------- statistics


def t95(df: int) -> float:
    if df < 1:
        return float("nan")
    known = [d for d in _T95 if d <= df]
    return _T95[max(known)] if df <= 30 else 1.96


def mean_sd(x: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan")


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of a - b over seeds and its 95% confidence interval (Student's t)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    m, sd = mean_sd(d)
    half = t95(len(d) - 1) * sd / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return m, m - half, m + half


def at_tokens(run: Run, metric: str, budget: float) -> float:
    """The metric at `budget` generated tokens, interpolated linearly between evaluations."""
    _, tokens, _, values = run.curve(metric)
    return float(np.interp(budget, tokens, values))


# ---------------------------------------------------------------- report


def accuracy_key(runs: list[Run]) -> str:
    keys = sorted(k for k in runs[0].evals[-1] if k.startswith("val-core/") and "/acc/mean@" in k)
    if not keys:
        raise ValueError(f"run {runs[0].preset} seed {runs[0].seed} has no held-out accuracy")
    return keys[0]


def report(by_preset: dict[str, list[Run]], baseline: str) -> str:
    runs = [r for rs in by_preset.values() for r in rs]
    acc = accuracy_key(runs)
    pass_key = acc.replace("/acc/mean@", "/acc/pass@")
    smallest = min(r.curve(acc)[1][-1] for r in runs)
    budgets = [f * smallest for f in TOKEN_FRACTIONS]
    steps = [int(s) for s in runs[0].curve(acc)[0]]
    pct = lambda m, s: f"{100 * m:.1f} ± {100 * s:.1f}"  # noqa: E731
    lines = [f"Held-out `{acc}` in %, mean ± sd over seeds; `{pass_key}` at the last step.", "",
             "| preset | seeds | " + " | ".join(f"step {s}" for s in steps) + " | pass@k | tokens per tree | "
             "effective trees | training s |",
             "|---" * (len(steps) + 6) + "|"]
    for preset, rs in by_preset.items():
        cells = [pct(*mean_sd([r.curve(acc)[3][i] for r in rs])) for i in range(len(steps))]
        tokens = mean_sd([sum(x["tree/generated_tokens"] for x in r.records if x["step"] > 0) for r in rs])[0]
        eff = mean_sd([np.mean([x["tree/eff_rate"] for x in r.records if x["step"] > 0]) for r in rs])[0]
        wall = mean_sd([r.curve(acc)[2][-1] for r in rs])[0]
        lines.append(f"| {preset} | {len(rs)} | " + " | ".join(cells) +
                     f" | {pct(*mean_sd([r.evals[-1][pass_key] for r in rs]))} | {tokens:,.0f} | {eff:.2f} | {wall:.0f} |")
    lines += ["", "At equal generated tokens (each run's total so far; the budgets are shares of the smallest run's "
              "total, accuracy interpolated between evaluations):", "",
              "| preset | " + " | ".join(f"{b:,.0f} tokens" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for preset, rs in by_preset.items():
        lines.append(f"| {preset} | " + " | ".join(pct(*mean_sd([at_tokens(r, acc, b) for r in rs])) for b in budgets) + " |")
    lines += ["", f"Paired differences from `{baseline}` over the seeds both ran (points, 95% CI):", "",
              "| preset | last step | at the largest common token budget |", "|---|---|---|"]
    base = {r.seed: r for r in by_preset[baseline]}
    for preset, rs in by_preset.items():
        if preset == baseline:
            continue
        both = [r for r in rs if r.seed in base]
        last = paired([r.curve(acc)[3][-1] for r in both], [base[r.seed].curve(acc)[3][-1] for r in both])
        budget = paired([at_tokens(r, acc, budgets[-1]) for r in both], [at_tokens(base[r.seed], acc, budgets[-1]) for r in both])
        fmt = lambda p: f"{100 * p[0]:+.1f} [{100 * p[1]:+.1f}, {100 * p[2]:+.1f}]"  # noqa: E731
        lines.append(f"| {preset} | {fmt(last)} | {fmt(budget)} |")
    return "\n".join(lines) + "\n"


def plot(by_preset: dict[str, list[Run]], out_dir: Path) -> list[Path]:
    """Accuracy against generated tokens and training time (mean over seeds, band: min to max), and
    the training dynamics: effective-tree share, mean IB-Score and Cov(eta1, eta2) by step."""
    from matplotlib.figure import Figure

    acc = accuracy_key([r for rs in by_preset.values() for r in rs])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, index, label in (("accuracy_vs_tokens.png", 1, "generated tokens"), ("accuracy_vs_time.png", 2, "training seconds")):
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.subplots()
        for preset, rs in by_preset.items():
            grid = np.linspace(0, min(r.curve(acc)[index][-1] for r in rs), 50)
            ys = np.stack([np.interp(grid, r.curve(acc)[index], r.curve(acc)[3]) for r in rs])
            ax.plot(grid, 100 * ys.mean(0), label=f"{preset} ({len(rs)} seeds)")
            ax.fill_between(grid, 100 * ys.min(0), 100 * ys.max(0), alpha=0.2)
        ax.set(xlabel=label, ylabel=f"{acc} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(out_dir / name, dpi=100)
        written.append(out_dir / name)
    fig = Figure(figsize=(7, 8), layout="constrained")
    for ax, metric in zip(fig.subplots(3, 1, sharex=True), ("tree/eff_rate", "ib/score_mean", "ib/cov_eta")):
        for preset, rs in by_preset.items():
            steps = [x["step"] for x in rs[0].records if x["step"] > 0 and metric in x]
            ys = np.array([[x.get(metric) for x in r.records if x["step"] > 0 and metric in x] for r in rs], float)
            ax.plot(steps, np.nanmean(ys, 0), label=preset)
        ax.set(ylabel=metric)
        ax.grid(alpha=0.3)
    ax.set(xlabel="step")
    ax.legend()
    fig.savefig(out_dir / "training_dynamics.png", dpi=100)
    return [*written, out_dir / "training_dynamics.png"]


# ---------------------------------------------------------------- command


def _args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m ibtpo_fast.study", description=__doc__.splitlines()[2])
    ap.add_argument("--presets", default="ibtpo,grpo", help="comma-separated presets; the last is the baseline")
    ap.add_argument("--seeds", type=int, default=8, help="seeds 0 .. N-1 per preset")
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
    if args.seeds < 1 or args.jobs < 1 or args.sampling < 0:
        ap.error("--seeds and --jobs must be >= 1, --sampling >= 0")
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
    from ibtpo_fast.config import load_config  # a bad override fails here, before any run starts

    with user_errors_end_cleanly():
        configs = [load_config([f"preset={p}", *overrides]) for p in args.presets]
    steps = configs[0].train.steps
    todo = [(p, s) for p in args.presets for s in range(args.seeds) if not is_finished(run_dir(out, p, s), steps)]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        failed = [str(e) for e in (f.exception() for f in [pool.submit(launch, out, p, s, overrides, threads)
                                                         for p, s in todo]) if e is not None]
    if failed:  # the finished runs are kept: the next call runs only the rest
        print("\n".join(f"study: {msg}" for msg in failed), file=sys.stderr)
        return 1
    by_preset = {p: [load_run(out, p, s) for s in range(args.seeds)] for p in args.presets}
    text = report(by_preset, baseline=args.presets[-1])
    (out / "results.md").write_text(f"`python -m ibtpo_fast.study {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n{text}")
    plot(by_preset, out / "plots")
    (out / "summary.json").write_text(json.dumps({p: [r.evals[-1] for r in rs] for p, rs in by_preset.items()}, indent=1))
    print(text)
    return 0


def _write(path: Path, command: str, text: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"`{command}`\n\n{text}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
