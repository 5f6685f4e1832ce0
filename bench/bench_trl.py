"""The TRL adapter against TRL's own GRPO, on the bundled model and task, in the same run.

Three trainings of the default workload (16 prompts a step, 40 steps, temperature 1, lr 2e-4 after 2
warm-up steps, KL 0.001, clip 0.2, token-mean loss, seed 0): TRL 1.16's `GRPOTrainer` (G = 8),
`IBTPOTrainer` inside TRL (IBTree 4,9,1,1, 12 leaves), and ibtpo_fast's own trainer (`python -m
ibtpo_fast.train`'s default). Each trained model is then evaluated alike: held-out avg@4 on 128
problems. Records each run's accuracy before and after, median step time, and the step-time ratios.
A smoke run (`--benchmark-disable`) trains 2 steps of 2 prompts and evaluates 8 problems.

Run: pytest bench/bench_trl.py --benchmark-only -s
"""
import statistics
import time

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from ibtpo_fast.config import load_config
from ibtpo_fast.data import encode_prompt
from ibtpo_fast.engines.protocol import SamplingParams
from ibtpo_fast.engines.torch_engine import TorchEngine
from ibtpo_fast.evaluation import evaluate
from ibtpo_fast.integrations.trl import IBTPOConfig, IBTPOTrainer
from ibtpo_fast.loading import load_policy, load_task
from ibtpo_fast.tasks import STEP_DELIMITER, compute_score
from ibtpo_fast.trainer import Trainer

ACC = "val-core/arithmetic/acc/mean@4"


def correct(completions, answer, **kwargs):
    return [compute_score("arithmetic", c, a) for c, a in zip(completions, answer)]


def heldout(model, tok, n: int) -> float:
    """avg@4 on the first n held-out problems, sampled at temperature 1 with fixed seeds."""
    task = load_task("arithmetic", val_size=n)
    prompts = [encode_prompt(r, tok, 256) for r in task.val]
    with task.scorer(10.0) as scorer:
        out = evaluate(TorchEngine(model, tokenizer=tok), tok, prompts, task.val, scorer, k=4, max_new_tokens=64,
                       sampling=SamplingParams(1.0), stop_token_ids=[tok.eos_token_id], seed=10_000)
    return out[ACC]


def trl_run(tmp, steps: int, prompts: int, trainer_cls, config_cls, group: int, **extra) -> tuple[torch.nn.Module, object, list]:
    model, tok = load_policy("", torch.device("cpu"))
    rows = load_task("arithmetic", val_size=1).train
    data = Dataset.from_list([{"prompt": r.prompt, "answer": r.ground_truth} for r in rows])
    args = config_cls(output_dir=str(tmp), num_generations=group, per_device_train_batch_size=prompts * group,
                      max_steps=steps, max_completion_length=64, temperature=1.0, learning_rate=2e-4, warmup_steps=2,
                      lr_scheduler_type="constant_with_warmup", max_grad_norm=1.0, beta=0.001, epsilon=0.2,
                      loss_type="dapo", use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=0,
                      disable_tqdm=True, **extra)
    trainer = trainer_cls(model=model, reward_funcs=[correct], train_dataset=data, processing_class=tok, args=args)
    trainer.train()
    return model, tok, [h["step_time"] for h in trainer.state.log_history if "step_time" in h]


def native_run(tmp, steps: int, prompts: int) -> tuple[torch.nn.Module, object, list]:
    trainer = Trainer(load_config([f"train.steps={steps}", f"data.batch_size={prompts}", "train.eval_every=0",
                                   "data.val_size=1", f"run.out_dir={tmp}", "run.resume=never", "run.progress=off"]))
    history = trainer.train()["history"]
    return trainer.model, trainer.tokenizer, [m["timing/step"] for m in history]


def test_trl_adapter_against_trl_grpo(benchmark, claim, tmp_path):
    smoke = benchmark.disabled
    steps, prompts, n = (2, 2, 8) if smoke else (40, 16, 128)
    model, tok = load_policy("", torch.device("cpu"))
    start_acc = heldout(model, tok, n)
    runs = {
        "trl_grpo": lambda: trl_run(tmp_path / "grpo", steps, prompts, GRPOTrainer, GRPOConfig, 8),
        "trl_ibtpo": lambda: trl_run(tmp_path / "ibtpo", steps, prompts, IBTPOTrainer, IBTPOConfig, 12, tree="4,9,1,1",
                                     step_delimiter=STEP_DELIMITER),
        "native_ibtpo": lambda: native_run(tmp_path / "native", steps, prompts),
    }
    results = {}

    def train_all():
        for name, run in runs.items():
            t0 = time.perf_counter()
            model, tok, step_times = run()
            results[name] = {"acc": heldout(model, tok, n), "step_s": statistics.median(step_times),
                             "wall_s": time.perf_counter() - t0}

    benchmark.pedantic(train_all, rounds=1, iterations=1)
    benchmark.extra_info["start_acc"] = start_acc
    for name, r in results.items():
        benchmark.extra_info.update({f"{name}_{k}": v for k, v in r.items()})
        print(f"{name:13s} held-out avg@4 {start_acc:.3f} -> {r['acc']:.3f}  median step {r['step_s']:.2f} s  "
              f"wall {r['wall_s']:.0f} s")
    claim("trl_ibtpo_step_vs_trl_grpo", results["trl_ibtpo"]["step_s"] / results["trl_grpo"]["step_s"])
    claim("native_ibtpo_step_vs_trl_ibtpo", results["native_ibtpo"]["step_s"] / results["trl_ibtpo"]["step_s"])
    assert all(0 <= r["acc"] <= 1 for r in results.values())
