import sys
from pathlib import Path

# Benchmarks reuse the tests' reference oracles and forest builders.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
