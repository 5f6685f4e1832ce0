"""`torchrun --nproc-per-node 2 tests/dist_timeout.py SECONDS`: rank 1 stalls; rank 0's collective gives up after
SECONDS (train.dist_timeout_s) and prints how long it waited."""
import sys
import time

from ibtpo_fast.distributed import init_world

world = init_world(float(sys.argv[1]))
if world.rank == 1:
    time.sleep(10)
    sys.exit(0)
start = time.perf_counter()
try:
    world.sum(1.0)
except RuntimeError:
    print(f"gave up after {time.perf_counter() - start:.1f} s", flush=True)
