"""The part of slime's API that `ibtpo_fast.integrations.slime` relies on, read from the pinned commit.

slime is not on PyPI, so its tests run against stand-ins for its types and hooks. `python -m
ibtpo_fast.integrations.slime_api GIT_DIR` reads the source of `SLIME_COMMIT` from a clone of
THUDM/slime (`git show`, so any checkout or bare mirror holding that commit will do), parses it with
`ast` (nothing is imported or run) and writes `slime_api.json` beside this file: `Sample`'s fields,
defaults and statuses, `RolloutFnTrainOutput`'s fields, the parameters of every slime function the
adapter calls or stands in for, how slime calls the advantage hook, the sample fields slime hands the
trainer, and the command-line options slime defines. The contract tests check the stand-ins and every
`args` attribute the adapter reads against that file. Rerun it when the pin moves.
"""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
from pathlib import Path
from typing import Any

from ibtpo_fast.integrations.slime import SLIME_COMMIT
from ibtpo_fast.source_ast import params

API_FILE = Path(__file__).with_name("slime_api.json")
TYPES_FILE = "slime/utils/types.py"
BASE_TYPES_FILE = "slime/rollout/base_types.py"
LOSS_FILE = "slime/backends/megatron_utils/loss.py"
ROLLOUT_MANAGER_FILE = "slime/ray/rollout.py"
OPTION_FILES = ("slime/utils/arguments.py", "slime/backends/sglang_utils/arguments.py")
# (file, function or Class.method): what the adapter calls, or what the tests stand in for
FUNCTIONS = (
    ("slime/utils/http_utils.py", "post"),
    ("slime/utils/http_utils.py", "get_rollout_num_engines"),
    ("slime/utils/async_utils.py", "get_async_loop"),
    ("slime/rollout/rm_hub/__init__.py", "async_rm"),
    ("slime/rollout/data_source.py", "RolloutDataSource.get_samples"),
    ("slime/rollout/sglang_rollout.py", "generate_rollout"),
)


def _source(git_dir: Path, path: str) -> ast.Module:
    text = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{SLIME_COMMIT}:{path}"],
                          check=True, capture_output=True, text=True).stdout
    return ast.parse(text)


def _named(body: list[ast.stmt], name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef:
    found = [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name]
    if not found:
        raise LookupError(f"no {name} in slime's source")
    return found[0]


def _dataclass(cls: ast.ClassDef) -> dict[str, Any]:
    """Field -> its default as source text (None: no default), and nested classes by name."""
    fields = {s.target.id: (ast.unparse(s.value) if s.value is not None else None)
              for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    nested = {c.name: c for c in cls.body if isinstance(c, ast.ClassDef)}
    return {"fields": fields, "nested": nested}


def _sample(tree: ast.Module) -> dict[str, Any]:
    sample = _dataclass(_named(tree.body, "Sample"))
    status = {s.targets[0].id: ast.literal_eval(s.value) for s in sample["nested"].pop("Status").body
              if isinstance(s, ast.Assign)}
    nested = {name: _dataclass(c)["fields"] for name, c in sample["nested"].items()}
    return {"fields": sample["fields"], "status": status, "nested": nested}


def _function(tree: ast.Module, dotted: str) -> dict[str, Any]:
    node: Any = tree
    for part in dotted.split("."):
        node = _named(node.body, part)
    return {"params": params(node), "async": isinstance(node, ast.AsyncFunctionDef)}


def _advantage_call(tree: ast.Module) -> list[str]:
    """The arguments slime passes the --custom-advantage-function-path hook (`custom_adv_fn(...)`)."""
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "custom_adv_fn"]
    if len(calls) != 1:
        raise LookupError(f"expected one call of custom_adv_fn in {LOSS_FILE}, found {len(calls)}")
    return [ast.unparse(a) for a in calls[0].args] + [f"{k.arg}=" for k in calls[0].keywords]


def _train_data_fields(tree: ast.Module) -> list[str]:
    """The Sample attributes `_convert_samples_to_train_data` reads: what reaches the trainer."""
    manager = _named(tree.body, "RolloutManager")
    convert = _named(manager.body, "_convert_samples_to_train_data")
    return sorted({n.attr for n in ast.walk(convert) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                   and n.value.id == "sample"})


def _options(trees: list[ast.Module]) -> dict[str, Any]:
    """The `args` attributes slime's parser defines (argparse dests of literal `add_argument("--...")` calls, and
    the Megatron options it redefines with `reset_arg(parser, "--...")`), and whether sglang-router's options
    join with their `router_` prefix."""
    dests, router_prefix = set(), False
    for tree in trees:
        for n in ast.walk(tree):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "reset_arg":
                dests.add(n.args[1].value[2:].replace("-", "_"))
            if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
                continue
            keywords = {k.arg: k.value for k in n.keywords}
            if n.func.attr == "add_argument" and n.args and isinstance(n.args[0], ast.Constant):
                dest = keywords.get("dest")
                flag = next(a.value for a in n.args if isinstance(a, ast.Constant) and a.value.startswith("--"))
                dests.add(dest.value if isinstance(dest, ast.Constant) else flag[2:].replace("-", "_"))
            elif n.func.attr == "add_cli_args" and isinstance(n.func.value, ast.Name) and n.func.value.id == "RouterArgs":
                prefix = keywords.get("use_router_prefix")
                router_prefix |= isinstance(prefix, ast.Constant) and prefix.value is True
    return {"dests": sorted(dests), "router_prefix": router_prefix}


def read_api(git_dir: Path) -> dict[str, Any]:
    base = _dataclass(_named(_source(git_dir, BASE_TYPES_FILE).body, "RolloutFnTrainOutput"))["fields"]
    return {
        "commit": SLIME_COMMIT,
        "sample": _sample(_source(git_dir, TYPES_FILE)),
        "rollout_fn_train_output": base,
        "functions": {f"{path}:{name}": _function(_source(git_dir, path), name) for path, name in FUNCTIONS},
        "advantage_hook_call": _advantage_call(_source(git_dir, LOSS_FILE)),
        "train_data_fields": _train_data_fields(_source(git_dir, ROLLOUT_MANAGER_FILE)),
        "options": _options([_source(git_dir, path) for path in OPTION_FILES]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("git_dir", type=Path, help="a THUDM/slime clone's .git directory (or a bare mirror)")
    api = read_api(parser.parse_args().git_dir)
    API_FILE.write_text(json.dumps(api, indent=1) + "\n")
    print(f"wrote {API_FILE}")


if __name__ == "__main__":
    main()
