"""What code a run ran: the git commit when there is one, and a digest of the code's own files (the
package's Python sources and bundled assets, the Triton kernels, the native walk's C++ sources when
beside them), which names the code exactly with or without git."""
from __future__ import annotations

import hashlib
import subprocess
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
_ROOT = PACKAGE.parent
_SOURCES = ("ibtpo_fast/**/*.py", "ibtpo_fast/assets/**/*", "kernels/**/*.py", "csrc/**/*")


@cache
def code_digest() -> str:
    """SHA-256 (first 16 hex digits) over the code's files, paths included."""
    h = hashlib.sha256()
    files = sorted({p for pattern in _SOURCES for p in _ROOT.glob(pattern) if p.is_file()
                    and "__pycache__" not in p.parts})
    for path in files:
        h.update(str(path.relative_to(_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@cache
def git_commit() -> str:
    """HEAD of the checkout the package lives in, with "+dirty" when its files differ from it;
    "" outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PACKAGE), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+dirty" if dirty else "")


def provenance() -> dict[str, str]:
    return {"commit": git_commit(), "code": code_digest()}
