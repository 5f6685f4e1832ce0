"""A study's report from its `runs.json` alone: accuracy at equal steps, equal generated tokens and
equal training time, and the first preset's paired differences from each other preset (Student's t
and a seed x problem bootstrap), with plots. `python -m ibtpo_fast.study --report DIR/runs.json`."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # equal-cost checkpoints, as shares of the smallest final cost of any run
BOOTSTRAP_DRAWS = 10_000
# Two-sided 95% quantiles of Student's t by degrees of freedom (the normal's beyond the table).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}
# Per-step training figures a run keeps in runs.json.
STEP_SERIES = ("tree/generated_tokens", "timing/step", "tree/eff_rate", "ib/score_mean", "ib/cov_eta")
EVAL_KEYS = {"steps": "step", "tokens": "tokens", "seconds": "seconds"}  # cost -> its key in an evaluation


@dataclass
class Run:
    """One run as runs.json keeps it: its evaluations (step, tokens, seconds, metrics, correct counts)
    and its per-step training series."""

    preset: str
    seed: int
    evals: list[dict[str, Any]]
    steps: dict[str, list[float | None]]

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Run:
        return cls(entry["preset"], int(entry["seed"]), entry["evals"], entry["steps"])

    def axis(self, cost: str) -> np.ndarray:
        """Steps, generated tokens or training seconds so far at each evaluation."""
        return np.array([e[EVAL_KEYS[cost]] for e in self.evals], np.float64)

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(steps, generated tokens so far, training seconds so far, metric) at each evaluation."""
        return (*(self.axis(c) for c in EVAL_KEYS), np.array([e["metrics"][metric] for e in self.evals]))

    def correct_at(self, cost: str, budget: float, k: int) -> np.ndarray:
        """Per-problem accuracy at `budget` of `cost`, interpolated linearly between the evaluations that
        bracket it, as the accuracy itself is (its mean over problems)."""
        x = self.axis(cost)
        counts = np.array([e["correct"] for e in self.evals], np.float64) / k
        if len(x) == 1:
            return counts[0]
        i = int(np.clip(np.searchsorted(x, budget, side="right") - 1, 0, len(x) - 2))
        w = float(np.clip((budget - x[i]) / (x[i + 1] - x[i]), 0.0, 1.0)) if x[i + 1] > x[i] else 1.0
        return (1 - w) * counts[i] + w * counts[i + 1]


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


def bootstrap(diff: np.ndarray, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean of `diff` [seeds, problems] when seeds and problems are
    resampled independently, with replacement."""
    rng = np.random.default_rng(seed)
    n_seeds, n_problems = diff.shape
    means = np.empty(draws)
    for b in range(draws):
        rows = diff[rng.integers(0, n_seeds, n_seeds)]
        means[b] = rows[:, rng.integers(0, n_problems, n_problems)].mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def at_cost(run: Run, metric: str, cost: str, budget: float) -> float:
    """The metric at `budget` of `cost` (steps, tokens or seconds), interpolated linearly between evaluations."""
    return float(np.interp(budget, run.axis(cost), run.curve(metric)[3]))


# ---------------------------------------------------------------- report


def accuracy_key(runs: list[Run]) -> str:
    keys = sorted(k for k in runs[0].evals[-1]["metrics"] if "/acc/mean@" in k)
    if not keys:
        raise ValueError(f"run {runs[0].preset} seed {runs[0].seed} has no held-out accuracy")
    return keys[0]


def _pct(m: float, s: float) -> str:
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def _diff(p: tuple[float, float, float], boot: tuple[float, float]) -> str:
    return f"{100 * p[0]:+.1f} [{100 * p[1]:+.1f}, {100 * p[2]:+.1f}] (bootstrap [{100 * boot[0]:+.1f}, {100 * boot[1]:+.1f}])"


def _largest_common(runs: Sequence[Run], cost: str) -> float:
    return min(r.axis(cost)[-1] for r in runs)


def _comparison(a: list[Run], b: list[Run], acc: str, k: int, cost: str) -> str:
    """a minus b, paired by seed, at the largest cost both reached."""
    base = {r.seed: r for r in b}
    both = [r for r in a if r.seed in base]
    budget = _largest_common(both + [base[r.seed] for r in both], cost)
    t = paired([at_cost(r, acc, cost, budget) for r in both], [at_cost(base[r.seed], acc, cost, budget) for r in both])
    diff = np.stack([r.correct_at(cost, budget, k) - base[r.seed].correct_at(cost, budget, k) for r in both])
    unit = {"steps": "steps", "tokens": "tokens", "seconds": "s"}[cost]
    return f"{_diff(t, bootstrap(diff))} at {budget:,.0f} {unit}"


def _cost_table(by_preset: dict[str, list[Run]], acc: str, cost: str, label: str) -> list[str]:
    runs = [r for rs in by_preset.values() for r in rs]
    budgets = [f * _largest_common(runs, cost) for f in FRACTIONS]
    lines = ["| preset | " + " | ".join(f"{b:,.0f} {label}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for preset, rs in by_preset.items():
        lines.append(f"| {preset} | " + " | ".join(_pct(*mean_sd([at_cost(r, acc, cost, b) for r in rs])) for b in budgets) + " |")
    return lines


def code_line(codes: dict[str, int]) -> str:
    """Which code the runs ran ("commit (code digest)": runs)."""
    if len(codes) == 1:
        return f"Every run ran the same code: {next(iter(codes))}."
    return "The runs ran different code: " + ", ".join(f"{c}: {n} runs" for c, n in codes.items()) + "."


def report(by_preset: dict[str, list[Run]], codes: dict[str, int]) -> str:
    """The report's markdown; the first preset is compared with each of the others. `codes`: the runs'
    code ("commit (digest)") and how many ran each."""
    runs = [r for rs in by_preset.values() for r in rs]
    acc = accuracy_key(runs)
    k = int(acc.rsplit("@", 1)[1])
    pass_key = acc.replace("/acc/mean@", "/acc/pass@")
    steps = [int(s) for s in runs[0].curve(acc)[0]]
    lines = [f"Held-out `{acc}` in %, mean ± sd over seeds; `{pass_key}` at the last step. Training seconds: "
             "the timing pass's, where the study ran one (each run's own otherwise).", "", code_line(codes), "",
             "| preset | seeds | " + " | ".join(f"step {s}" for s in steps) + " | pass@k | tokens per tree | "
             "effective trees | training s |",
             "|---" * (len(steps) + 6) + "|"]
    for preset, rs in by_preset.items():
        cells = [_pct(*mean_sd([r.curve(acc)[3][i] for r in rs])) for i in range(len(steps))]
        tokens = np.mean([np.nansum(np.array(r.steps["tree/generated_tokens"], float)) for r in rs])
        eff = np.mean([np.nanmean(np.array(r.steps["tree/eff_rate"], float)) for r in rs])
        wall = np.mean([r.curve(acc)[2][-1] for r in rs])
        lines.append(f"| {preset} | {len(rs)} | " + " | ".join(cells) +
                     f" | {_pct(*mean_sd([r.evals[-1]['metrics'][pass_key] for r in rs]))} | {tokens:,.0f} | {eff:.2f} | {wall:.0f} |")
    for cost, label, what in (("tokens", "tokens", "generated tokens (each run's total so far)"),
                              ("seconds", "s", "training time")):
        lines += ["", f"At equal {what}; the budgets are shares of the smallest run's total, accuracy interpolated "
                  "between evaluations:", "", *_cost_table(by_preset, acc, cost, label)]
    first, *others = by_preset
    lines += ["", f"Paired differences, `{first}` minus each other preset over the seeds both ran (points; Student's t "
              "95% CI, then the seed x problem bootstrap's), each at the largest cost both reached:", "",
              "| preset | equal steps | equal generated tokens | equal training time |", "|---|---|---|---|"]
    for preset in others:
        cells = [_comparison(by_preset[first], by_preset[preset], acc, k, cost) for cost in ("steps", "tokens", "seconds")]
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(by_preset: dict[str, list[Run]], out_dir: Path) -> list[Path]:
    """Accuracy against steps, generated tokens and training time (mean over seeds, band: min to max),
    and the training dynamics: effective-tree share, mean IB-Score and Cov(eta1, eta2) by step."""
    from matplotlib.figure import Figure

    acc = accuracy_key([r for rs in by_preset.values() for r in rs])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, cost, label in (("accuracy_vs_steps.png", "steps", "step"), ("accuracy_vs_tokens.png", "tokens", "generated tokens"),
                              ("accuracy_vs_time.png", "seconds", "training seconds")):
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.subplots()
        for preset, rs in by_preset.items():
            grid = np.linspace(0, _largest_common(rs, cost), 50)
            ys = np.stack([[at_cost(r, acc, cost, x) for x in grid] for r in rs])
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
            ys = np.array([r.steps[metric] for r in rs], float)
            ax.plot(np.arange(1, ys.shape[1] + 1), np.nanmean(ys, 0), label=preset)
        ax.set(ylabel=metric)
        ax.grid(alpha=0.3)
    ax.set(xlabel="step")
    ax.legend()
    fig.savefig(out_dir / "training_dynamics.png", dpi=100)
    return [*written, out_dir / "training_dynamics.png"]


def by_preset(data: dict[str, Any]) -> dict[str, list[Run]]:
    """runs.json's runs grouped by preset, in the study's preset order."""
    runs = [Run.from_json(r) for r in data["runs"]]
    return {p: [r for r in runs if r.preset == p] for p in data["presets"]}


def codes(data: dict[str, Any]) -> dict[str, int]:
    """How many of runs.json's runs ran each code: "commit (digest)"."""
    out: dict[str, int] = {}
    for r in data["runs"]:
        key = f"{r.get('commit') or 'no commit'} (code {r['code']})"
        out[key] = out.get(key, 0) + 1
    return out
