"""Build a small forest by hand and print its IB-Scores and step-level advantages."""
from __future__ import annotations

import numpy as np

from ibtpo_fast import Forest, walk


def build_demo_forest(seed: int = 0) -> Forest:
    """A root with four chains rewarded 1, 0, 0, 1, then two branches under chosen nodes."""
    rng = np.random.default_rng(seed)
    f = Forest()
    root = f.add_tree([1, 2, 3])
    first_steps = []
    for reward in (1, 0, 0, 1):
        nodes = f.add_chain(root, [[4, 5], [6], [7, 8, 9]], -rng.exponential(0.4, 6))
        f.set_reward(nodes[-1], reward)
        first_steps.append(nodes[0])
    for parent, reward in ((first_steps[1], 1), (first_steps[0], 1)):
        nodes = f.add_chain(parent, [[10], [11, 12]], -rng.exponential(0.4, 3))
        f.set_reward(nodes[-1], reward)
    return f


def main() -> None:
    f = build_demo_forest()
    w = walk(f)
    depth = f.depth()
    print(f"{'node':>4} {'parent':>6} {'depth':>5} {'leaves':>6} {'p':>6} {'pi':>6} {'IB':>8} {'A':>8}")
    for i in range(len(f)):
        print(f"{i:>4} {f.parent[i]:>6} {depth[i]:>5} {w.leaves[i]:>6} {w.p[i]:>6.3f} {w.step_prob[i]:>6.3f} "
              f"{w.ib_score[i]:>8.3f} {w.advantage[i]:>8.3f}")
    print(f"ib/score_mean {w.ib_score_mean:.4f}  ib/cov_eta {w.cov_eta_mean:.4f}  "
          f"tree/eff_rate {w.effective.mean():.2f}  trajectories {len(f.trajectories())}")


if __name__ == "__main__":
    main()
