"""The part of SGLang's API that `SGLangEngine` relies on, read from the pinned release's source.

`python -m ibtpo_fast.engines.sglang_api` downloads the pinned wheel (`pip download --no-deps`), parses
its source with `ast` (nothing is imported or run) and writes `sglang_api.json` beside this file: the
parameters of every `sglang.Engine` method the adapter calls, the attributes it reads, the
`SamplingParams` fields, the server arguments an engine accepts, and the protocol facts the adapter and
the tests' stand-in engine rely on (`protocol`: weight-update sessions, what needs an idle server, the
seed gate, the context rule, what shutdown kills, the answers' shapes). The contract tests check every
call the adapter makes and every fact the stand-in encodes against that file, so a change in SGLang
fails CI without a GPU. Rerun it when the pin moves.
"""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ibtpo_fast.engines.sglang_engine import SGLANG_VERSION
from ibtpo_fast.source_ast import params

API_FILE = Path(__file__).with_name("sglang_api.json")
ENGINE_FILE = "sglang/srt/entrypoints/engine.py"
SAMPLING_FILE = "sglang/srt/sampling/sampling_params.py"
SERVER_ARG_FIELDS = "sglang/srt/arg_groups/fields/"  # ServerArgs is assembled from these groups' fields
ENGINE_METHODS = ("generate", "async_generate", "begin_weight_update", "update_weights_from_tensor", "end_weight_update",
                  "flush_cache", "release_memory_occupation", "resume_memory_occupation", "get_all_child_pids", "shutdown")
ENGINE_ATTRIBUTES = ("loop", "tokenizer_manager")
WEIGHT_UPDATER_FILE = "sglang/srt/managers/scheduler_components/weight_updater.py"
CONTROL_FILE = "sglang/srt/managers/tokenizer_control_mixin.py"
TOKENIZER_FILE = "sglang/srt/managers/tokenizer_manager.py"
SCHEDULER_FILE = "sglang/srt/managers/scheduler.py"
IO_FILE = "sglang/srt/managers/io_struct.py"
BATCH_FILE = "sglang/srt/managers/schedule_batch.py"
SAMPLING_BATCH_FILE = "sglang/srt/sampling/sampling_batch_info.py"
CHOICES_FILE = "sglang/srt/arg_groups/choices.py"
SESSION_METHODS = ("begin_weight_update", "update_weights_from_tensor", "end_weight_update")


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    if not found:
        raise LookupError(f"no class {name} in the SGLang source")
    return found[0]


def _fields(cls: ast.ClassDef) -> list[str]:
    return [s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]


def _self_attributes(node: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
            and isinstance(n.value, ast.Name) and n.value.id == "self"}


def _method(source: dict[str, str], path: str, cls: str, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    found = [f for f in _class(ast.parse(source[path]), cls).body
             if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name == name]
    if not found:
        raise LookupError(f"no method {cls}.{name} in the SGLang source")
    return found[0]


def _calls(fn: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(fn) if isinstance(n, ast.Call) and ast.unparse(n.func) == name]


def _session_refusal(fn: ast.AST) -> str | None:
    """The `message=` string the method answers with when the state of its weight-update session refuses it."""
    for branch in (n for n in ast.walk(fn) if isinstance(n, ast.If) and "self._session" in ast.unparse(n.test)):
        for call in (n for stmt in branch.body for n in ast.walk(stmt) if isinstance(n, ast.Call)):
            for kw in call.keywords:
                if kw.arg == "message" and isinstance(kw.value, ast.Constant):
                    return kw.value.value
    return None


def _list_constant(tree: ast.Module, name: str) -> list[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
    raise LookupError(f"no list {name} in the SGLang source")


def _seed_gate(source: dict[str, str]) -> str | None:
    """The server flag without which `sampling_seed` is dropped: the name the batch's seeds are gated on
    (`sampling_seed = (...) if flag else None`), traced to the attribute it was read from."""
    fn = _method(source, SAMPLING_BATCH_FILE, "SamplingBatchInfo", "from_schedule_batch")
    assigned = {t.id: n.value for n in ast.walk(fn) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    gate = assigned.get("sampling_seed")
    if not (isinstance(gate, ast.IfExp) and isinstance(gate.orelse, ast.Constant) and gate.orelse.value is None
            and isinstance(gate.test, ast.Name) and isinstance(assigned.get(gate.test.id), ast.Attribute)):
        return None
    return assigned[gate.test.id].attr


def _idle_assert(fn: ast.AST) -> str | None:
    """The message of the function's assert that the server is idle."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert) and _calls(node.test, "self.is_fully_idle") and isinstance(node.msg, ast.Constant):
            return node.msg.value
    return None


def _finish_types(tree: ast.Module) -> list[str]:
    return sorted({v.value for cls in tree.body if isinstance(cls, ast.ClassDef) and cls.name.startswith("FINISH")
                   for d in ast.walk(cls) if isinstance(d, ast.Dict)
                   for k, v in zip(d.keys, d.values) if isinstance(k, ast.Constant) and k.value == "type"
                   and isinstance(v, ast.Constant)})


def read_protocol(source: dict[str, str]) -> dict[str, Any]:
    """What the release does beyond its signatures, each fact read from the place in its source that decides it."""
    shutdown = _method(source, ENGINE_FILE, "Engine", "shutdown")
    init = _method(source, ENGINE_FILE, "Engine", "__init__")
    validate = _method(source, TOKENIZER_FILE, "TokenizerManager", "_validate_one_request")
    logprobs = _method(source, TOKENIZER_FILE, "TokenizerManager", "detokenize_logprob_tokens")
    return {
        "refusals": {m: _session_refusal(_method(source, WEIGHT_UPDATER_FILE, "SchedulerWeightUpdaterManager", m))
                     for m in SESSION_METHODS},
        "answers": {m: ast.unparse(_method(source, CONTROL_FILE, "TokenizerControlMixin", m).returns)
                    for m in (*SESSION_METHODS, "flush_cache")},
        "flush_cache_output": _fields(_class(ast.parse(source[IO_FILE]), "FlushCacheReqOutput")),
        "release_needs_idle": _idle_assert(_method(source, WEIGHT_UPDATER_FILE, "SchedulerWeightUpdaterManager",
                                                   "release_memory_occupation")),
        "flush_needs_idle": bool(_calls(_method(source, SCHEDULER_FILE, "Scheduler", "flush_cache"), "self.is_fully_idle")),
        "seed_gate": _seed_gate(source),
        "deterministic_attention_backends": _list_constant(ast.parse(source[CHOICES_FILE]),
                                                           "DETERMINISTIC_ATTENTION_BACKEND_CHOICES"),
        "attention_backends": _list_constant(ast.parse(source[CHOICES_FILE]), "ATTENTION_BACKEND_CHOICES"),
        "context_checks": [ast.unparse(n) for n in ast.walk(validate) if isinstance(n, ast.Compare)
                           and any(x in ast.unparse(n) for x in ("context_len", "_max_req_len"))],
        "tokenizer_manager_sets_context_len": "context_len" in _self_attributes(_class(ast.parse(source[TOKENIZER_FILE]),
                                                                                        "TokenizerManager")),
        "abort_request": params(_method(source, TOKENIZER_FILE, "TokenizerManager", "abort_request")),
        "shutdown_kills": [ast.unparse(c) for c in _calls(shutdown, "kill_process_tree")],
        "shutdown_at_exit": bool(_calls(init, "atexit.register")),
        "finish_reasons": _finish_types(ast.parse(source[BATCH_FILE])),
        "output_token_logprob": [ast.unparse(n.elt) for n in ast.walk(logprobs)
                                 if isinstance(n, ast.ListComp) and isinstance(n.elt, ast.Tuple)],
    }


def _sources(where: Path) -> dict[str, str]:
    """Every .py file of a wheel, or of an installed package directory `where`/sglang, by its path in the wheel."""
    if where.is_dir():
        return {p.relative_to(where).as_posix(): p.read_text() for p in (where / "sglang").rglob("*.py")}
    with zipfile.ZipFile(where) as z:
        return {n: z.read(n).decode() for n in z.namelist() if n.endswith(".py")}


def read_api(wheel: Path) -> dict[str, Any]:
    """The API of the sglang wheel (or the directory holding an installed `sglang` package) at `wheel`."""
    source = _sources(wheel)
    engine = _class(ast.parse(source[ENGINE_FILE]), "Engine")
    methods = {f.name: params(f) for f in engine.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    init = next(f for f in engine.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    attributes = _self_attributes(init)
    server_args = {name for path, text in source.items() if path.startswith(SERVER_ARG_FIELDS)
                   for cls in ast.walk(ast.parse(text)) if isinstance(cls, ast.ClassDef) for name in _fields(cls)}
    return {
        "version": SGLANG_VERSION,
        "engine_methods": {m: methods[m] for m in ENGINE_METHODS if m in methods},
        "engine_attributes": sorted(a for a in ENGINE_ATTRIBUTES if a in attributes),
        "sampling_params": sorted(_fields(_class(ast.parse(source[SAMPLING_FILE]), "SamplingParams"))),
        "server_args": sorted(server_args),
        "protocol": read_protocol(source),
    }


def download(version: str, into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"sglang=={version}", "-d", str(into)],
                   check=True)
    return next(into.glob("sglang-*.whl"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, help="an sglang wheel already on disk (default: download the pin)")
    ap.add_argument("--out", type=Path, default=API_FILE)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        api = read_api(args.wheel or download(SGLANG_VERSION, Path(tmp)))
    args.out.write_text(json.dumps(api, indent=1) + "\n")
    print(f"wrote {args.out}: {len(api['engine_methods'])} engine methods, {len(api['sampling_params'])} sampling "
          f"params, {len(api['server_args'])} server args of sglang {api['version']}")


if __name__ == "__main__":
    main()
