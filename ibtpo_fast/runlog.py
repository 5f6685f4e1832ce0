"""Run logging: metrics.jsonl, a progress bar, optional tensorboard / wandb, and plots.

`metrics.jsonl` holds one JSON object per logged step, `{"step": N, "<metric>": value, ...}`;
non-finite values are written as null so every line stays valid JSON. Each line is appended, flushed
and fsynced as it is logged, so a step's record is on disk before its checkpoint; a last line cut
short by a crash is skipped by `read_metrics` and dropped when the run resumes. `evals.jsonl` holds,
per held-out evaluation, `{"step": N, "correct": [...]}`: each problem's count of correct samples.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from ibtpo_fast.errors import MissingExtraError

SCORE = "critic/score/mean"
ACC_PATTERN = "val-core/*/acc/mean@*"
ENTROPY = "actor/entropy"
TOKENS_PER_S = "perf/tokens_per_s"
PROGRESS_MODES = ("auto", "on", "off")  # auto: a bar when stderr is a terminal
EVALS_FILE = "evals.jsonl"


def read_metrics(metrics_jsonl: Path) -> list[dict]:
    """The records of a metrics file. A final line cut short by a crash is ignored; any other
    unparseable line is an error."""
    lines = [(n, ln) for n, ln in enumerate(Path(metrics_jsonl).read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
    records = []
    for k, (lineno, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if k == len(lines) - 1:
                break
            raise ValueError(f"{metrics_jsonl} line {lineno}: invalid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{metrics_jsonl} line {lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def _jsonable(key: str, value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):  # numpy and torch scalars
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int)):
        return value
    raise TypeError(f"metric {key!r} has non-scalar value of type {type(value).__name__}")


def _sync(f: TextIO) -> None:
    # once a step, milliseconds: a record is on disk before the checkpoint that follows it
    f.flush()
    os.fsync(f.fileno())


class SilentLogger:
    """The logger of every rank but rank 0 under data parallelism: rank 0 alone prints and writes."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_eval(self, step: int, correct: list[int]) -> None:
        pass

    def print(self, msg: str) -> None:
        pass

    def __enter__(self) -> SilentLogger:
        return self

    def __exit__(self, *exc) -> None:
        pass


class RunLogger:
    """Writes each step's metrics to `run_dir/metrics.jsonl` (and tensorboard / wandb when
    asked) and shows one progress bar over steps.

    progress: "auto" shows the bar only when stderr is a terminal; "on" / "off" force it. Without
    a bar each `log` prints a one-line summary instead. Resuming (start_step > 0) keeps the
    records up to start_step and drops later ones, which the resumed run writes again; a fresh
    run (start_step == 0) starts an empty file.
    """

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        *,
        progress: str = "auto",
        tensorboard: bool = False,
        wandb: bool = False,
        config: dict | None = None,
        start_step: int = 0,
    ):
        if progress not in PROGRESS_MODES:
            raise ValueError(f"progress must be one of {', '.join(PROGRESS_MODES)}, got {progress!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self._tb = self._open_tensorboard() if tensorboard else None
        self._wandb = self._open_wandb(config) if wandb else None
        self.evals_path = self.run_dir / EVALS_FILE
        for path in (self.path, self.evals_path):
            self._keep_history(path, start_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._evals = self.evals_path.open("a", encoding="utf-8")
        show = sys.stderr.isatty() if progress == "auto" else progress == "on"
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr) if show else None
        self._last: dict[str, str] = {}
        self._postfix: dict[str, str] = {}

    @staticmethod
    def _keep_history(path: Path, start_step: int) -> None:
        kept = [r for r in read_metrics(path) if start_step > 0 and r.get("step", 0) <= start_step] if path.exists() else []
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))
            _sync(f)
        os.replace(tmp, path)

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingExtraError("tensorboard logging needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _open_wandb(self, config: dict | None):
        try:
            import wandb
        except ImportError:
            raise MissingExtraError("wandb logging needs the wandb package: pip install wandb") from None
        # project and entity come from WANDB_PROJECT / WANDB_ENTITY when set
        return wandb.init(name=self.run_dir.name, dir=str(self.run_dir), config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _jsonable(k, v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        _sync(self._file)
        numeric = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        self._update_summary(record)
        if self._bar is not None:
            self._bar.update(max(0, step - self._bar.n))
            self._bar.set_postfix(self._postfix, refresh=True)
        else:
            print(f"step {step}/{self.total_steps} " + " ".join(f"{k}={v}" for k, v in self._postfix.items()), flush=True)

    def log_eval(self, step: int, correct: list[int]) -> None:
        """An evaluation's correct samples per held-out problem, to `evals.jsonl`."""
        self._evals.write(json.dumps({"step": step, "correct": correct}) + "\n")
        _sync(self._evals)

    def _update_summary(self, record: dict) -> None:
        # keep the last value of each shown metric: validation runs only every few steps
        accs = [v for k, v in record.items() if fnmatch.fnmatchcase(k, ACC_PATTERN) and v is not None]
        latest = {"reward": record.get(SCORE), "acc": sum(accs) / len(accs) if accs else None,
                  "entropy": record.get(ENTROPY), "tok/s": record.get(TOKENS_PER_S)}
        for name, value in latest.items():
            if isinstance(value, (int, float)):
                self._last[name] = f"{value:.0f}" if name == "tok/s" else f"{value:.3f}"
        self._postfix = {name: self._last[name] for name in latest if name in self._last}

    def print(self, msg: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._bar is not None:
            tqdm.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        self._file.close()
        self._evals.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- plots

# file name -> panels, each panel a list of metric-name patterns drawn on one set of axes
PLOTS: dict[str, list[list[str]]] = {
    "accuracy.png": [[ACC_PATTERN, SCORE]],
    "entropy.png": [[ENTROPY]],
    "ib_score.png": [["ib/score_mean"], ["ib/cov_eta"]],
    "eff_rate.png": [["tree/eff_rate"]],
    "tokens.png": [["tree/generated_tokens"], ["tree/trajectories"]],
}


def _series(records: list[dict], patterns: list[str]) -> dict[str, tuple[list, list]]:
    keys = sorted({k for r in records for k in r if k != "step" and any(fnmatch.fnmatchcase(k, p) for p in patterns)})
    out = {}
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
        if pts:
            out[key] = ([s for s, _ in pts], [v for _, v in pts])
    return out


def plot_metrics(metrics_jsonl: Path, out_dir: Path) -> list[Path]:
    """One PNG per metric group present in the file; returns the paths written."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    records = read_metrics(metrics_jsonl)
    out_dir = Path(out_dir)
    written = []
    for name, panels in PLOTS.items():
        drawn = [s for s in (_series(records, p) for p in panels) if s]
        if not drawn:
            continue
        fig = Figure(figsize=(7, 2.6 * len(drawn) + 0.6), layout="constrained")
        axes = fig.subplots(len(drawn), 1, sharex=True, squeeze=False)[:, 0]
        for ax, series in zip(axes, drawn):
            for key, (steps, values) in series.items():
                ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
            ax.legend(fontsize="small")
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / name
        fig.savefig(path, dpi=100)
        written.append(path)
    return written
