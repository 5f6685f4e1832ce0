"""What the fidelity files read from a pinned release's source with `ast`, shared by the SGLang and slime readers."""
from __future__ import annotations

import ast


def params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """A function's parameter names in order, without `self`, and "**" when it takes keyword arguments."""
    a = fn.args
    return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg != "self"] + (["**"] if a.kwarg else [])
