"""IB-TPO inside TRL's GRPOTrainer on the bundled tiny model and arithmetic task; runs on a CPU in minutes.

    python examples/trl_ibtpo.py --output-dir runs/trl_ibtpo --max-steps 40

Swap in your own model (any HF causal LM and its tokenizer), dataset (a `prompt` column plus what your
reward functions read) and reward functions; everything else is a `GRPOConfig`. `num_generations` and
`per_device_train_batch_size` follow the tree: tree "2,3,1,2" grows 2 + (3-1)*1*2 = 6 leaves a prompt.
"""
import argparse
import json
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from ibtpo_fast.integrations.trl import IBTPOConfig, IBTPOTrainer
from ibtpo_fast.sampler import TreeSpec
from ibtpo_fast.tasks import STEP_DELIMITER, compute_score, make_split, tiny_model_path


def correct(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """A plain TRL reward function: 1 when the completion ends with `A:<answer>`."""
    return [compute_score("arithmetic", c, a) for c, a in zip(completions, answer)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(tiny_model_path()), help="HF checkpoint (default: the bundled tiny model)")
    parser.add_argument("--output-dir", default="runs/trl_ibtpo")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--tree", default="2,3,1,2", help="B0,L,K,B")
    a = parser.parse_args()

    model, tokenizer = AutoModelForCausalLM.from_pretrained(a.model), AutoTokenizer.from_pretrained(a.model)
    data = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in make_split("train", 512)])
    leaves = TreeSpec.parse(a.tree).trajectories  # num_generations follows the tree
    args = IBTPOConfig(
        output_dir=a.output_dir, tree=a.tree, step_delimiter=STEP_DELIMITER,  # the task's steps are lines
        per_device_train_batch_size=a.prompts_per_step * leaves,  # whole trees on each process
        max_steps=a.max_steps, max_completion_length=64, temperature=1.0, learning_rate=1e-3, beta=0.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0)
    trainer = IBTPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[correct], train_dataset=data, args=args)
    trainer.train()
    out = Path(a.output_dir) / "log_history.json"
    out.write_text(json.dumps(trainer.state.log_history, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
