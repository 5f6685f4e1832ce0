"""`python -m ibtpo_fast.evaluate --model DIR [--data arithmetic|FILE[,FILE]] [--k 8]`

avg@k and unbiased pass@k per data source, for a Hugging Face checkpoint (a run's
`checkpoints/global_step_N/` included). Without --model: the bundled tiny model.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ibtpo_fast.data import PromptRow, encode_prompt, load_files
from ibtpo_fast.engines.protocol import SamplingParams
from ibtpo_fast.engines.torch_engine import TorchEngine
from ibtpo_fast.evaluation import evaluate
from ibtpo_fast.rewards import RewardScorer, default_math_reward, load_reward_fn


def _rows(data: str, n: int) -> list[PromptRow]:
    if data == "arithmetic":
        from ibtpo_fast.tasks import prompt_rows

        return prompt_rows("test", n)
    return load_files(data)[:n]


def _reward_fn(data: str, spec: str) -> Any:
    if spec:
        return load_reward_fn(spec)
    if data == "arithmetic":
        from ibtpo_fast.tasks import compute_score

        return compute_score
    return default_math_reward()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ibtpo_fast.evaluate", description=__doc__.splitlines()[2])
    ap.add_argument("--model", default="", help="HF checkpoint directory (default: the bundled tiny model)")
    ap.add_argument("--data", default="arithmetic", help="'arithmetic' or jsonl/parquet files, comma-separated")
    ap.add_argument("--n", type=int, default=256, help="problems to evaluate")
    ap.add_argument("--k", type=int, default=8, help="samples per problem")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=-1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--reward-fn", default="", help="module:function in verl's compute_score contract")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.k < 1 or args.n < 1:
        ap.error("--k and --n must be >= 1")
    if not args.model:
        from ibtpo_fast.tasks import tiny_model_path

        args.model = str(tiny_model_path())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
    tok = AutoTokenizer.from_pretrained(args.model)
    rows, fn = _rows(args.data, args.n), _reward_fn(args.data, args.reward_fn)
    prompts = [encode_prompt(r, tok, args.max_prompt_tokens) for r in rows]
    with RewardScorer(fn, workers=1 if args.reward_fn else 0) as scorer:
        result = evaluate(TorchEngine(model, tokenizer=tok), tok, prompts, rows, scorer, k=args.k,
                          max_new_tokens=args.max_new_tokens,
                          sampling=SamplingParams(args.temperature, args.top_p, args.top_k),
                          stop_token_ids=[tok.eos_token_id] if tok.eos_token_id is not None else [], seed=args.seed)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
