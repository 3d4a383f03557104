"""The sharded peer exchange between real processes: same peers as the unsharded path, 1/n of the cross-group bytes."""

import pytest

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


def test_shared_initialisation_broadcasts_group_0_at_full_precision(exchanged):
    _, _, ranks = exchanged
    group_0 = next(r["own"] for r in ranks if r["group_index"] == 0)
    assert {r["broadcast"] for r in ranks} == {group_0}


def test_models_of_another_shape_are_refused_even_with_as_many_values(exchanged):
    _, _, ranks = exchanged
    for rank in ranks:
        assert "Every group must train the same architecture" in rank["transposed"]
        assert "other names, shapes or precisions" in rank["transposed"]
