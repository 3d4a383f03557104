"""The teardown order that keeps an `env://` store alive until every rank has left."""

import threading
import time

import torch.distributed as dist

from hf_codistill.topology import leave_in_order


def test_world_rank_zero_leaves_only_after_every_other_rank():
    store = dist.HashStore()
    zero = threading.Thread(target=leave_in_order, args=(store, 0, 4, "leaving"))
    zero.start()
    for rank in (1, 2, 3):
        time.sleep(0.2)
        assert zero.is_alive(), f"rank 0 left before rank {rank}"
        leave_in_order(store, rank, 4, "leaving")
    zero.join(timeout=5)
    assert not zero.is_alive()


def test_a_rank_that_never_leaves_holds_rank_zero_only_until_the_timeout():
    store = dist.HashStore()
    start = time.monotonic()
    leave_in_order(store, 1, 3, "leaving")  # rank 2 crashed and never says it leaves
    leave_in_order(store, 0, 3, "leaving", leave_timeout=0.5)
    assert 0.5 <= time.monotonic() - start < 5
