"""`python -m ibtpo_fast.evaluate --model DIR [--data arithmetic|arithmetic_hard|FILE[,FILE]] [--k 8]`

avg@k and unbiased pass@k per data source, for a Hugging Face checkpoint (a run's
`checkpoints/global_step_N/` included). Without --model: the bundled task's tiny model.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ibtpo_fast.checkpoint import verify_checkpoint
from ibtpo_fast.config import SGLangConfig
from ibtpo_fast.data import encode_prompt
from ibtpo_fast.engines.protocol import SamplingParams
from ibtpo_fast.errors import user_errors_end_cleanly
from ibtpo_fast.evaluation import evaluate
from ibtpo_fast.loading import (
    DTYPES,
    ENGINES,
    TASKS,
    build_engine,
    check_engine,
    default_max_new_tokens,
    load_policy,
    load_task,
    model_dir,
    resolve_device,
    stop_token_ids,
)


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m ibtpo_fast.evaluate", description=__doc__.splitlines()[2])
    ap.add_argument("--model", default="", help="HF checkpoint directory (default: the bundled tiny model)")
    ap.add_argument("--data", default="arithmetic",
                    help="a bundled task (arithmetic, arithmetic_hard) or jsonl/parquet files, comma-separated")
    ap.add_argument("--n", type=int, default=256, help="problems to evaluate")
    ap.add_argument("--k", type=int, default=8, help="samples per problem")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=-1)
    ap.add_argument("--max-new-tokens", type=int, default=0, help="per response; 0: the task's own length")
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--reward-fn", default="", help="module:function in verl's compute_score contract")
    ap.add_argument("--reward-workers", type=int, default=2, help="processes scoring a --reward-fn or the math grader")
    ap.add_argument("--reward-timeout-s", type=float, default=10.0)
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--engine", default="torch", choices=ENGINES, help="rollout engine (sglang: CUDA and the [sglang] extra)")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="run the Python code the model directory ships (only for ones you trust)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.k < 1 or args.n < 1:
        ap.error("--k and --n must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict[str, float]:
    check_engine(args.engine)
    name = args.data if args.data in TASKS and args.data != "file" else "file"
    task = load_task(name, val_files="" if name != "file" else args.data, val_size=args.n,
                     reward_fn=args.reward_fn, reward_workers=args.reward_workers)
    if args.model:
        verify_checkpoint(Path(args.model), shards=False)  # a run's checkpoint: its files against its manifest
    model, tok = load_policy(args.model, resolve_device(args.device), args.dtype,
                             trust_remote_code=args.trust_remote_code, task=name)
    prompts = [encode_prompt(r, tok, args.max_prompt_tokens) for r in task.val]
    with task.scorer(args.reward_timeout_s) as scorer:
        engine = build_engine(args.engine, model, tok, model_path=model_dir(args.model, name), dtype=args.dtype,
                              seed=args.seed, sglang=SGLangConfig())
        return evaluate(engine, tok, prompts, task.val, scorer, k=args.k,
                        max_new_tokens=args.max_new_tokens or default_max_new_tokens(name),
                        sampling=SamplingParams(args.temperature, args.top_p, args.top_k),
                        stop_token_ids=stop_token_ids(model, tok), seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    with user_errors_end_cleanly():
        result = run(args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
