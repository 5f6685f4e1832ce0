"""The bundled arithmetic task as verl-format parquet, which verl and slime both read.

    python examples/bundled_task_data.py data/arithmetic   # writes train.parquet and test.parquet

Each row: `prompt` as a chat list, `data_source`, `reward_model.ground_truth`, `extra_info` (verl's
RLHFDataset), and `label`, the answer again, for slime's --label-key.
"""
import argparse
from pathlib import Path

from datasets import Dataset

from ibtpo_fast.tasks import make_split


def rows(split: str, n: int) -> list[dict]:
    return [{"data_source": "arithmetic", "prompt": [{"role": "user", "content": p.prompt}],
             "reward_model": {"style": "rule", "ground_truth": p.answer}, "extra_info": {"split": split, "index": i},
             "label": p.answer} for i, p in enumerate(make_split(split, n))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train-size", type=int, default=4096)
    parser.add_argument("--test-size", type=int, default=256)
    a = parser.parse_args()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", a.train_size), ("test", a.test_size)):
        Dataset.from_list(rows(split, n)).to_parquet(a.out_dir / f"{split}.parquet")
    print(f"wrote {a.out_dir}/train.parquet and test.parquet")


if __name__ == "__main__":
    main()
