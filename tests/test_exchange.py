"""Peer sets: the exchange between real processes (sharded: same peers as the unsharded path, 1/n of the
cross-group bytes), and the copies of G models in one process."""

import pytest
import torch

from hf_codistill.local_peers import LocalPeers
from tests.conftest import SCRIPTS

SCRIPT = SCRIPTS / "exchange_peers.py"
# Per-dtype buckets of the script's model: 40 float32, 3 float64 and 11 int64 values (so shards need padding).
BUCKETS = [(40, 4), (3, 8), (11, 8)]


@pytest.fixture(scope="module", params=[(6, 3)], ids=["3_groups_of_2"])
def exchanged(request, tmp_path_factory, launcher):
    num_processes, num_groups = request.param
    ranks = launcher(SCRIPT, num_processes, ["--num_groups", str(num_groups)],
                     tmp_path_factory.mktemp("exchange") / "results", timeout=120)
    return num_groups, num_processes // num_groups, ranks


def test_sharded_exchange_brings_the_same_peers_with_a_shard_of_the_bytes(exchanged):
    num_groups, group_size, ranks = exchanged
    own = {r["group_index"]: r["own"] for r in ranks}
    shard_bytes = sum(-(-numel // group_size) * size for numel, size in BUCKETS)
    for rank in ranks:
        expected = {str(g): own[g] for g in range(num_groups) if g != rank["group_index"]}
        sharded, unsharded = rank["sharded"], rank["unsharded"]
        assert sharded["is_sharded"] and not unsharded["is_sharded"]
        assert sharded["peers"] == unsharded["peers"] == expected
        assert unsharded["bytes_sent"] == unsharded["bytes_received"] == (num_groups - 1) * rank["model_bytes"]
        assert sharded["bytes_sent"] == sharded["bytes_received"] == (num_groups - 1) * shard_bytes
        assert sharded["group_bytes_received"] == (group_size - 1) * (num_groups - 1) * shard_bytes
        assert unsharded["group_bytes_received"] == 0
    # Across the boundary a whole group moves (G - 1) x P (plus padding) instead of n x (G - 1) x P.
    padded_model_bytes = sum(-(-numel // group_size) * group_size * size for numel, size in BUCKETS)
    group_0 = [r for r in ranks if r["group_index"] == 0]
    assert sum(r["sharded"]["bytes_sent"] for r in group_0) == (num_groups - 1) * padded_model_bytes


def test_an_exchange_in_bounded_buckets_brings_the_same_peers(exchanged):
    """A blocking exchange moves one bucket of at most `EXCHANGE_BUCKET_BYTES` at a time (16 bytes here: one
    tensor, or less, per bucket), sharded or not."""
    num_groups, _, ranks = exchanged
    own = {r["group_index"]: r["own"] for r in ranks}
    for rank in ranks:
        expected = {str(g): own[g] for g in range(num_groups) if g != rank["group_index"]}
        assert rank["bounded"] == {"sharded": expected, "unsharded": expected}


def test_exchange_in_the_background_applies_the_snapshot_at_finish(exchanged):
    _, _, ranks = exchanged
    snapshot = {r["group_index"]: r["overlap"]["snapshot"] for r in ranks}
    for rank in ranks:
        overlap = rank["overlap"]
        # Until finished, the peers stay what they were; then they are each peer's snapshot, not its later values.
        assert overlap["in_flight"] == overlap["before"]
        assert overlap["applied"] and overlap["after"] == {g: snapshot[int(g)] for g in overlap["after"]}
        assert overlap["last_exchange_step"] == 5 and overlap["again"] is False


def test_peers_in_bfloat16_halve_the_floating_point_bytes(exchanged):
    num_groups, group_size, ranks = exchanged
    own = {r["group_index"]: r["bfloat16"]["own"] for r in ranks}
    # 40 float32 and 3 float64 values travel as one bfloat16 bucket; the 11 int64 values are not cast.
    shard_bytes = sum(-(-numel // group_size) * size for numel, size in [(43, 2), (11, 8)])
    for rank in ranks:
        received = rank["bfloat16"]
        assert received["peers"] == {str(g): own[g] for g in range(num_groups) if g != rank["group_index"]}
        assert received["dtypes"] == ["torch.bfloat16", "torch.int64"]
        assert received["bytes_sent"] == (num_groups - 1) * shard_bytes


def test_peers_in_int8_hold_and_move_a_quarter_of_the_weight_bytes(exchanged):
    num_groups, group_size, ranks = exchanged
    own = {r["group_index"]: r["int8"]["own"] for r in ranks}
    # The 35 weights travel as int8 beside their 5 row scales and the 5-value bias (float32), 3 float64, 11 int64.
    shard_bytes = sum(-(-numel // group_size) * size for numel, size in [(35, 1), (10, 4), (3, 8), (11, 8)])
    for rank in ranks:
        received = rank["int8"]
        assert received["peers"] == {str(g): own[g] for g in range(num_groups) if g != rank["group_index"]}
        assert received["dtypes"] == {"linear.weight": "torch.int8", "linear.weight#scale": "torch.float32",
                                      "linear.bias": "torch.float32", "scale": "torch.float64",
                                      "counts": "torch.int64"}
        assert received["bytes_sent"] == (num_groups - 1) * shard_bytes
        assert received["weight_error_in_scales"] <= 0.5 + 1e-4


def test_shared_initialisation_broadcasts_group_0_at_full_precision(exchanged):
    _, _, ranks = exchanged
    group_0 = next(r["own"] for r in ranks if r["group_index"] == 0)
    assert {r["broadcast"] for r in ranks} == {group_0}


def test_models_of_another_shape_are_refused_even_with_as_many_values(exchanged):
    _, _, ranks = exchanged
    for rank in ranks:
        assert "Every group must train the same architecture" in rank["transposed"]
        assert "other names, shapes or precisions" in rank["transposed"]


@pytest.fixture(scope="module")
def ring_of_four(tmp_path_factory, launcher):
    """G = 4 groups of 1 process, each distilling from the next group only (m = 1)."""
    return launcher(SCRIPT, 4, ["--num_groups", "4", "--ring_only"], tmp_path_factory.mktemp("ring") / "results",
                    timeout=120)


def _ring_checks(ranks, num_groups, group_size):
    own = {rank["group_index"]: rank["own"] for rank in ranks}
    model_bytes = ranks[0]["model_bytes"]
    for rank in ranks:
        group = rank["group_index"]
        following, preceding = (group + 1) % num_groups, (group - 1) % num_groups
        for mode, ring in rank["ring"].items():
            # One peer held, the next group's model; this group's model goes to the group before it only.
            assert ring["peers"] == {str(following): pytest.approx(own[following])}, (mode, group)
            assert ring["readers"] == [preceding]
            sharded = mode == "sharded" and group_size > 1
            per_exchange = sum(-(-numel // group_size) * size for numel, size in BUCKETS) if sharded else model_bytes
            # Two exchanges of one model (a shard of it, sharded) each way: 1/(G-1) of the all-gather's bytes.
            assert ring["bytes_sent"] == ring["bytes_received"] == 2 * per_exchange


def test_a_bounded_peer_set_fetches_the_next_group_alone(ring_of_four, exchanged):
    _ring_checks(ring_of_four, num_groups=4, group_size=1)
    num_groups, group_size, ranks = exchanged
    _ring_checks(ranks, num_groups, group_size)


# ---- One process: the peer set of G local models --------------------------------------------------------------


def _linear_models(count):
    torch.manual_seed(0)
    return {group: torch.nn.Linear(3, 2) for group in range(count)}


def test_local_copies_are_frozen_and_refresh_only_when_asked():
    models = _linear_models(3)
    peers = LocalPeers(models, live=False, dtype=torch.bfloat16)
    assert sorted(peers.peers_of(1)) == [0, 2] and peers.dtype == torch.bfloat16
    copy_ = peers.peers_of(1)[2]
    assert not copy_.training and not any(p.requires_grad for p in copy_.parameters())
    with torch.no_grad():
        models[2].bias.add_(1.0)
    assert not torch.equal(copy_.bias, models[2].bias.to(torch.bfloat16))
    peers.refresh(step=4)
    assert torch.equal(copy_.bias, models[2].bias.to(torch.bfloat16))
    assert peers.checkpoint_state()["last_exchange_step"] == 4 and peers.counters() == {"peer_exchanges": 1}


def test_live_peers_are_the_models_themselves():
    models = _linear_models(2)
    peers = LocalPeers(models, live=True, dtype=torch.bfloat16)
    assert peers.peers_of(0)[1] is models[1] and peers.copies is None and peers.dtype is None


def test_each_models_checkpoint_holds_the_others_and_together_restore_every_copy():
    models = _linear_models(3)
    peers = LocalPeers(models, live=False)
    peers.refresh(step=0)
    states = {group: peers.state_dict(group) for group in models}
    assert {key.split(".")[0] for key in states[1]} == {"group_0", "group_2"}
    restored = LocalPeers({group: torch.nn.Linear(3, 2) for group in models}, live=False)
    for state in states.values():
        restored.load_state_dict(state)
    for group in models:
        assert torch.equal(restored.copies[group].weight, models[group].weight)


def test_a_shared_initialisation_needs_one_architecture():
    models = {0: torch.nn.Linear(3, 2), 1: torch.nn.Linear(3, 4)}
    with pytest.raises(ValueError, match="codistill_shared_init=False"):
        LocalPeers(models, live=True).share_initialisation()
