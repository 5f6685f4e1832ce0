"""`python -m ibtpo_fast.train [--config FILE] [preset=NAME] [key=value ...]`

With no arguments: IB-TPO on the bundled tiny model and arithmetic task, on the CPU, in minutes.
Under `torchrun --nproc-per-node N -m ibtpo_fast.train ...`: data-parallel over N ranks.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from ibtpo_fast.config import load_config
from ibtpo_fast.errors import user_errors_end_cleanly


def summary_table(result: dict) -> str:
    before, after, history = result["before"], result["after"], result["history"]
    rows = []
    for key in sorted(k for k in before if k.startswith("val-core/")):
        rows.append((key, f"{before[key]:.3f} -> {after.get(key, float('nan')):.3f}"))

    def mean(name: str) -> float:
        vals = [h[name] for h in history if name in h]
        return sum(vals) / len(vals) if vals else float("nan")

    for name in ("tree/trajectories_per_1k_tokens", "tree/eff_rate", "ib/score_mean", "critic/score/mean"):
        rows.append((name + " (mean over steps)", f"{mean(name):.3f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@record  # under torchrun, a rank's error is what the launcher reports when it stops the other ranks
def main(argv: Sequence[str] | None = None) -> int:
    """Bad input (config, data files, reward function, a missing package) ends with one line and exit code 2."""
    with user_errors_end_cleanly():
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        from ibtpo_fast.distributed import close_world
        from ibtpo_fast.trainer import Trainer  # heavy imports after the config is known to be good

        trainer = Trainer(cfg)  # checks what only the loaded model can tell (its attention, its device)
        result = trainer.train()
        close_world()
    if trainer.world.is_main:
        print(summary_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
