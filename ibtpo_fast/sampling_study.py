"""The branching rules compared by sampling alone (the paper's Table 3), and the IB tree's open choices.

`python -m ibtpo_fast.study --sampling N [--candidates] [-- key=value ...]` grows one tree per training
prompt under each rule, from the starting model, and reports what each costs and yields: tokens,
effective trees, trajectory accuracy, where the branches went (root picks, how much of a response a
continuation skips, pick depth) and what the rollout took (decode steps, wall time). `--candidates` adds
every reconstruction of the IB tree's open choices (docs/algorithm.md section 9). The raw totals go to
`sampling.json` with the commit and config of each arm; `--select a.json b.json ...` applies section 9's
pre-registered rule to such files and writes `selection.md`.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ibtpo_fast.errors import DataError

PAPER_LAMBDA = 0.1
G8, G12, RANDOM = "independent G=8", "independent G=12", "random tree (4,9,1,1)"
BASELINES = {
    G8: ["preset=grpo"],
    G12: ["preset=grpo", "rollout.tree=12,1,1,1"],
    # the random and entropy trees as section 9's rule measured them (the root a candidate in every round)
    RANDOM: ["preset=random_tree", "rollout.branch_root=true"],
    "entropy tree (4,9,1,1)": ["preset=entropy_tree", "rollout.branch_root=true"],
    "IB tree (4,9,1,1)": ["preset=ibtpo"],  # the default reading
}
# The open choices of docs/algorithm.md section 9, each as (name, [(label, override), ...]); the first
# value of each is the reading the first release shipped.
CHOICES = (
    ("root", [("root kept", "rollout.branch_root=true"), ("root dropped", "rollout.branch_root=false")]),
    ("norm", [("mean", "algo.ib_norm=mean"), ("sum", "algo.ib_norm=sum")]),
    ("pi", [("geomean", "algo.step_prob=geomean"), ("product", "algo.step_prob=product")]),
    ("tie", [("shallow", "rollout.tie_break=shallow"), ("deep", "rollout.tie_break=deep")]),
)
# Stage 2 of section 9: each refines the stage-1 winner; (label, override given the response length)
REFINEMENTS = (
    ("min step 4", lambda max_new: "rollout.min_step_tokens=4"),
    ("room 1/8", lambda max_new: f"rollout.min_branch_room={max(1, max_new // 8)}"),
)
TOKENS_LIMIT = 1.03  # section 9's rule: tokens a tree within this factor of independent G=8's
ACCURACY_MARGIN = 0.001  # "above" another rule's trajectory accuracy: by at least 0.1 point


def candidate_arms(vary: Sequence[str] = tuple(name for name, _ in CHOICES)) -> dict[str, list[str]]:
    """Every combination of the CHOICES named in `vary` (the others at their first value), as arm name ->
    overrides on `preset=ibtpo`. A name spells every choice, so names agree across workloads."""
    unknown = set(vary) - {name for name, _ in CHOICES}
    if unknown:
        raise ValueError(f"--candidates: unknown choices {sorted(unknown)}; choose from {', '.join(n for n, _ in CHOICES)}")
    arms = {}
    for combo in itertools.product(*(values if name in vary else values[:1] for name, values in CHOICES)):
        arms["IB " + " / ".join(label for label, _ in combo)] = ["preset=ibtpo", *(o for _, o in combo)]
    return arms


def refine_arms(winner: Sequence[str], max_new_tokens: int) -> dict[str, list[str]]:
    """The stage-1 winner (`winner`: its overrides) and each of REFINEMENTS on top of it."""
    base = ["preset=ibtpo", *winner]
    label = "IB " + " ".join(winner)
    return {label: base, **{f"{label} + {name}": [*base, make(max_new_tokens)] for name, make in REFINEMENTS}}


def provenance() -> dict[str, Any]:
    """The commit the numbers come from, and whether the tree had uncommitted changes."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain", "--", "."))}


# ---------------------------------------------------------------- measuring


def sample_arm(cfg, problems: int) -> dict[str, Any]:
    """Totals of one arm over the first `problems` training prompts, `data.batch_size` trees a call (a
    training step's rollout), one engine for the arm."""
    from ibtpo_fast.data import encode_prompt
    from ibtpo_fast.engines.torch_engine import TorchEngine
    from ibtpo_fast.loading import load_policy, resolve_device, stop_token_ids
    from ibtpo_fast.sampler import IBTreeSampler
    from ibtpo_fast.trainer import sampler_config, task_of
    from ibtpo_fast.walk import walk

    task = task_of(cfg, val_size=1)
    model, tok = load_policy(cfg.model.path, resolve_device(cfg.model.device), cfg.model.dtype, task=cfg.data.task)
    rows = task.train[:problems]
    keys = ("trees", "trajectories", "tokens", "effective", "correct", "abs_adv_ib", "abs_adv_gl", "response_tokens",
            "picks", "root_picks", "pick_prefix_tokens", "cov_picked_sum", "cov_picked_n", "seconds", "clipped")
    t = dict.fromkeys(keys, 0.0)
    depths: list[int] = []
    with task.scorer(cfg.rollout.reward_timeout_s) as scorer:
        def reward(batch_rows, responses):
            texts = tok.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
            return scorer([r.data_source for r in batch_rows], texts, [r.ground_truth for r in batch_rows],
                          [r.extra_info for r in batch_rows])

        engine = TorchEngine(model, tokenizer=tok)
        sampler = IBTreeSampler(engine, tok, reward, sampler_config(cfg, stop_token_ids(model, tok)))
        steps_before = engine.stats()["decode_steps"]
        for start in range(0, len(rows), cfg.data.batch_size):
            part = rows[start : start + cfg.data.batch_size]
            prompts = [encode_prompt(r, tok, cfg.data.max_prompt_tokens) for r in part]
            t0 = time.perf_counter()
            rollout = sampler.sample(prompts, part)
            t["seconds"] += time.perf_counter() - t0
            _add_rollout(t, depths, rollout, walk(rollout.forest, beta=cfg.algo.beta, lam=PAPER_LAMBDA,
                                                 eps=cfg.algo.eps, step_prob=cfg.algo.step_prob))
        t["decode_steps"] = float(engine.stats()["decode_steps"] - steps_before)
    return {**t, "pick_depths": depths}


def _add_rollout(t: dict[str, float], depths: list[int], rollout, w) -> None:
    f, m = rollout.forest, rollout.metrics
    leaves, steps = f.is_leaf, f.parent >= 0
    t["trees"] += f.num_trees
    t["trajectories"] += int(leaves.sum())
    t["tokens"] += float(rollout.generated_tokens.sum())
    t["effective"] += float(w.effective.sum())
    t["correct"] += float(f.reward[leaves].sum())
    t["response_tokens"] += float(f.response_lengths()[leaves].sum())
    t["clipped"] += m["response_length/clip_ratio"] * int(leaves.sum())
    t["abs_adv_ib"] += float(np.nansum(np.abs(w.adv_ib[steps]) * f.num_tokens[steps]))
    t["abs_adv_gl"] += float(np.nansum(np.abs(w.adv_global[steps]) * f.num_tokens[steps]))
    for p in rollout.picks:
        t["picks"] += 1
        t["root_picks"] += p.depth == 0
        t["pick_prefix_tokens"] += p.response_len
        if np.isfinite(p.cov_eta):
            t["cov_picked_sum"] += p.cov_eta
            t["cov_picked_n"] += 1
        depths.append(p.depth)


def run(problems: int, overrides: Sequence[str], vary: Sequence[str], refine: Sequence[str], command: str,
        cache: Path | None = None) -> dict[str, Any]:
    """Every arm's totals, with the provenance and resolved config of each: the baselines, plus the
    stage-1 candidates varying the choices `vary` and the stage-2 refinements of the winner `refine`.
    An arm whose resolved config another arm already sampled reuses its totals (sampling is seeded), and
    so does a rerun: each arm's totals go to `cache` as they finish, keyed by commit, problems and config,
    so an interrupted study resumes with the arms it still lacks (an uncommitted tree never reuses)."""
    from ibtpo_fast.config import load_config, to_dict

    arms = dict(BASELINES)
    if vary:
        arms.update(candidate_arms(vary))
    if refine:
        arms.update(refine_arms(refine, load_config(["preset=ibtpo", *overrides]).rollout.max_new_tokens))
    out = {"command": command, "problems": problems, "overrides": list(overrides), **provenance(), "arms": {}}
    reusable = cache is not None and not out["dirty"]
    done: dict[str, dict[str, Any]] = json.loads(cache.read_text()) if reusable and cache.exists() else {}
    for name, arm_args in arms.items():
        cfg = load_config([*arm_args, *overrides])
        # the preset's name draws nothing, so two presets resolving to one config share a key
        key = json.dumps({"commit": out["commit"], "problems": problems, **to_dict(cfg), "preset": ""}, sort_keys=True)
        if key not in done:
            t0 = time.perf_counter()
            done[key] = sample_arm(cfg, problems)
            print(f"[sampling] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            if reusable:
                cache.write_text(json.dumps(done))
        out["arms"][name] = {"args": arm_args, "config": to_dict(cfg), **done[key]}
    return out


# ---------------------------------------------------------------- reporting


def figures(a: dict[str, Any], g8: dict[str, Any]) -> dict[str, float]:
    """An arm's per-tree figures, and its costs against independent G=8's."""
    nan = float("nan")
    mean_response = a["response_tokens"] / a["trajectories"]
    return {
        "trajectories": a["trajectories"] / a["trees"],
        "tokens": a["tokens"] / a["trees"],
        "tokens_vs_g8": (a["tokens"] / a["trees"]) / (g8["tokens"] / g8["trees"]),
        "effective": a["effective"] / a["trees"],
        "accuracy": a["correct"] / a["trajectories"],
        "per_1k": 1000 * a["trajectories"] / a["tokens"],
        "per_1k_vs_g8": (a["trajectories"] / a["tokens"]) / (g8["trajectories"] / g8["tokens"]),
        "root_picks": a["root_picks"] / a["picks"] if a["picks"] else nan,
        "pick_prefix": a["pick_prefix_tokens"] / a["picks"] / mean_response if a["picks"] else nan,
        "decode_steps_vs_g8": a["decode_steps"] / g8["decode_steps"],
        "seconds_vs_g8": a["seconds"] / g8["seconds"],
        "cov_picked": a["cov_picked_sum"] / a["cov_picked_n"] if a["cov_picked_n"] else nan,
        "local_vs_global": PAPER_LAMBDA * a["abs_adv_ib"] / max(a["abs_adv_gl"], 1e-12),
        "clipped": a["clipped"] / a["trajectories"],
    }


def table(data: dict[str, Any]) -> str:
    arms, g8 = data["arms"], data["arms"][G8]
    lines = [f"{int(g8['trees'])} training problems, one tree each, sampled from the starting model "
             f"(commit {data['commit'][:12]}{' + local changes' if data['dirty'] else ''}). Ratios are against "
             "independent G=8 in the same run; prefix at pick = response tokens already on a picked node's path, "
             "as a share of the mean response length.", "",
             "| branching | trajectories per tree | tokens per tree | tokens vs G=8 | effective trees | trajectory accuracy "
             "| trajectories per 1k tokens | per 1k vs G=8 | root picks | prefix at pick | decode steps vs G=8 "
             "| rollout time vs G=8 | Cov(eta1, eta2) at picks | clipped | 0.1 mean abs A_IB / mean abs A_GL |",
             "|---" * 16 + "|"]
    for name, a in arms.items():
        f = figures(a, g8)
        lines.append(f"| {name} | {f['trajectories']:.1f} | {f['tokens']:.0f} | {f['tokens_vs_g8']:.2f}x | "
                     f"{100 * f['effective']:.1f}% | {100 * f['accuracy']:.1f}% | {f['per_1k']:.1f} | "
                     f"{f['per_1k_vs_g8']:.2f}x | {_pct(f['root_picks'])} | {_pct(f['pick_prefix'])} | "
                     f"{f['decode_steps_vs_g8']:.2f}x | {f['seconds_vs_g8']:.2f}x | {_num(f['cov_picked'])} | "
                     f"{100 * f['clipped']:.1f}% | {f['local_vs_global']:.3f} |")
    return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return "-" if np.isnan(x) else f"{100 * x:.1f}%"


def _num(x: float) -> str:
    return "-" if np.isnan(x) else f"{x:+.4f}"


def plot_pick_depth(data: dict[str, Any], path: Path) -> Path:
    """Share of picks at each depth (steps below the root), one line per branching rule that picks."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for name, a in data["arms"].items():
        if a["pick_depths"]:
            counts = np.bincount(a["pick_depths"])
            ax.plot(np.arange(len(counts)), 100 * counts / counts.sum(), marker=".", label=name,
                    lw=2.5 if name in BASELINES else 1, alpha=1 if name in BASELINES else 0.6)
    ax.set(xlabel="depth of the picked node (0: root)", ylabel="share of picks (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=100)
    return path


# ---------------------------------------------------------------- the pre-registered rule (section 9)


def shortfall(f: dict[str, float], ref: dict[str, dict[str, float]]) -> tuple[float, list[bool]]:
    """Section 9's distance of one candidate on one workload from the paper's Table 3 signature, and
    which of its three criteria it meets: tokens within 1.03x of G=8's, effective trees at least G=12's,
    trajectory accuracy above independent sampling's and random branching's."""
    best_acc = max(ref[k]["accuracy"] for k in (G8, G12, RANDOM))
    gaps = [max(0.0, f["tokens_vs_g8"] - TOKENS_LIMIT), max(0.0, ref[G12]["effective"] - f["effective"]),
            max(0.0, best_acc + ACCURACY_MARGIN - f["accuracy"])]
    return sum(gaps), [g == 0 for g in gaps]


def changes(arm: dict[str, Any]) -> int:
    """How many open choices a candidate reads differently from the first release (a refinement is one)."""
    defaults = {o.split("=")[0]: o for _, values in CHOICES for o in [values[0][1]]}
    keys = {a.split("=")[0]: a for a in arm["args"] if a != "preset=ibtpo"}
    return sum(k not in defaults or defaults[k] != a for k, a in keys.items())


def select(files: Sequence[Path]) -> str:
    """Section 9's rule over the candidates' files (one per workload): the lowest summed shortfall, then
    the fewest changed choices, then the lowest mean tokens against G=8."""
    runs: dict[str, dict[str, Any]] = {}
    for path in files:  # each file is named by the task its arms sampled
        try:
            data = json.loads(Path(path).read_text())
            task = data["arms"][G8]["config"]["data"]["task"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"--select: {path} is not a sampling.json of `study --sampling` ({type(e).__name__}: {e})") from e
        if task in runs:
            raise DataError(f"--select: two files sample {task!r}; give one file per workload")
        runs[task] = data
    first = next(iter(runs.values()))["arms"]
    names = [n for n in first if n not in BASELINES and all(n in d["arms"] for d in runs.values())]
    if not names:
        raise DataError("--select: the files share no candidate (run --sampling N --candidates on each workload)")
    rows = []
    for name in names:
        per, total = [], 0.0
        for d in runs.values():
            ref = {k: figures(d["arms"][k], d["arms"][G8]) for k in (G8, G12, RANDOM)}
            f = figures(d["arms"][name], d["arms"][G8])
            s, met = shortfall(f, ref)
            total += s
            per.append((f, met))
        tokens = float(np.mean([f["tokens_vs_g8"] for f, _ in per]))
        rows.append((total, changes(first[name]), tokens, name, per))
    rows.sort(key=lambda r: r[:3])
    head = " | ".join(f"{w}: tokens vs G=8, eff, acc, met" for w in runs)
    lines = [f"Workloads: {', '.join(runs)}. Criteria met are marked T (tokens), E (effective trees), "
             "A (trajectory accuracy).", "",
             f"| candidate | shortfall | changed choices | {head} |", "|---" * (3 + len(runs)) + "|"]
    for total, n_changed, _, name, per in rows:
        cells = [f"{f['tokens_vs_g8']:.2f}x, {100 * f['effective']:.1f}%, {100 * f['accuracy']:.1f}%, "
                 f"{''.join(c for c, ok in zip('TEA', met) if ok) or '-'}" for f, met in per]
        lines.append(f"| {name} | {total:.4f} | {n_changed} | " + " | ".join(cells) + " |")
    best = rows[0]
    verdict = "meets every criterion on every workload" if best[0] == 0 else "is the closest by the rule; none meets every criterion"
    return "\n".join(lines) + f"\n\nChosen: **{best[3]}**, which {verdict}.\n"
