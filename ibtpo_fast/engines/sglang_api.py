"""The part of SGLang's API that `SGLangEngine` relies on, read from the pinned release's source.

`python -m ibtpo_fast.engines.sglang_api` downloads the pinned wheel (`pip download --no-deps`), parses
its source with `ast` (nothing is imported or run) and writes `sglang_api.json` beside this file: the
parameters of every `sglang.Engine` method the adapter calls, the attributes it reads, the
`SamplingParams` fields and the server arguments an engine accepts. The contract tests check every
call the adapter makes against that file, so a parameter that SGLang renames or removes fails CI
without a GPU. Rerun it when the pin moves.
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

API_FILE = Path(__file__).with_name("sglang_api.json")
ENGINE_FILE = "sglang/srt/entrypoints/engine.py"
SAMPLING_FILE = "sglang/srt/sampling/sampling_params.py"
SERVER_ARG_FIELDS = "sglang/srt/arg_groups/fields/"  # ServerArgs is assembled from these groups' fields
ENGINE_METHODS = ("generate", "async_generate", "update_weights_from_tensor", "flush_cache",
                  "release_memory_occupation", "resume_memory_occupation", "shutdown")
ENGINE_ATTRIBUTES = ("loop",)


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    if not found:
        raise LookupError(f"no class {name} in the SGLang source")
    return found[0]


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg != "self"] + (["**"] if a.kwarg else [])


def _fields(cls: ast.ClassDef) -> list[str]:
    return [s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]


def read_api(wheel: Path) -> dict[str, Any]:
    with zipfile.ZipFile(wheel) as z:
        source = {n: z.read(n).decode() for n in z.namelist() if n.endswith(".py")}
    engine = _class(ast.parse(source[ENGINE_FILE]), "Engine")
    methods = {f.name: _params(f) for f in engine.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    init = next(f for f in engine.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    attributes = {n.attr for n in ast.walk(init) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                  and isinstance(n.value, ast.Name) and n.value.id == "self"}
    server_args = {name for path, text in source.items() if path.startswith(SERVER_ARG_FIELDS)
                   for cls in ast.walk(ast.parse(text)) if isinstance(cls, ast.ClassDef) for name in _fields(cls)}
    return {
        "version": SGLANG_VERSION,
        "engine_methods": {m: methods[m] for m in ENGINE_METHODS if m in methods},
        "engine_attributes": sorted(a for a in ENGINE_ATTRIBUTES if a in attributes),
        "sampling_params": sorted(_fields(_class(ast.parse(source[SAMPLING_FILE]), "SamplingParams"))),
        "server_args": sorted(server_args),
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
