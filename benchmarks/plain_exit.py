"""How a plain all-reduce worker ends (the benchmarks', and the tests' plain-Trainer reference in
`tests/scripts/train_digits.py`): in step with the other ranks, without the interpreter's teardown.

Twice in CI (and once in the tests' reference) a plain DDP worker on gloo aborted after its results were written
("terminate called without an active exception", SIGABRT, one rank of four): gloo's threads were still joinable when
the process group and the DDP reducer that holds it were torn down at exit. A worker whose results are on disk has
nothing left to tear down, so after a last barrier it leaves at once. (Codistillation workers tear their groups down
in order at exit: `hf_codistill.topology.destroy_groups`.)
"""

import os
import sys

import torch.distributed as dist


def exit_plain_worker() -> None:
    """Barrier with every rank, flush, and leave without running the interpreter's teardown."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
