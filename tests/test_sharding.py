"""FSDP2 groups: peers sharded like the student and exchanged shard to shard (`hf_codistill.sharding`), checked on
4 CPU processes (2 groups x 2) with torch's `fully_shard` applied directly, against unsharded references."""

import json

from tests.conftest import SCRIPTS


def test_sharded_peers_equal_the_other_groups_model_bit_for_bit(tmp_path, launcher):
    launcher(SCRIPTS / "sharded_peers.py", 4, [str(tmp_path)], None)
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert [rank["group"] for rank in ranks] == [0, 0, 1, 1]
    for rank in ranks:
        # After a distilled training step of the sharded student (equal to the whole reference's step) and a second
        # exchange, the peer gathered whole is the other group's model, bit for bit, and computes its logits.
        assert rank["student_matches_reference"] and rank["peer_equals_other_group"] and rank["peer_logits_match"]
        assert not rank["peer_requires_grad"]
        # Each rank holds half of the peer (P/n) and sends its shards only: P/n per exchange, nothing gathered in
        # the group.
        assert rank["peer_local_numel"] * 2 == rank["model_numel"]
        assert rank["bytes_sent"] == 2 * rank["local_bytes"] and rank["group_bytes_received"] == 0
