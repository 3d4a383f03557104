"""The distillation term against hand computations, with ignored positions."""

import math
import weakref

import pytest
import torch

from hf_codistill.losses import (
    causal_lm_mask,
    distillation_loss,
    distillation_to_peers,
    sample_positions,
    select_labelled_positions,
)


def _hand_losses(student, peer, temperature):
    """(KL, soft cross-entropy), T²-scaled and averaged over positions, with plain Python floats."""
    kl = ce = 0.0
    for s_row, p_row in zip(student.tolist(), peer.tolist()):
        s = [x / temperature for x in s_row]
        p = [x / temperature for x in p_row]
        log_zs = math.log(sum(math.exp(x) for x in s))
        log_zp = math.log(sum(math.exp(x) for x in p))
        for sc, pc in zip(s, p):
            q = math.exp(pc - log_zp)
            kl += q * ((pc - log_zp) - (sc - log_zs))
            ce -= q * (sc - log_zs)
    scale = temperature**2 / len(student)
    return kl * scale, ce * scale


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 5, generator=generator, dtype=torch.float64)
    peer = torch.randn(2, 4, 5, generator=generator, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, -100, 1], [0, -100, -100, 4]])
    return student, peer, labels


def test_only_labelled_positions_take_part(batch):
    student, _, labels = batch
    selected = select_labelled_positions(student, labels)
    assert selected.shape == (4, 5)
    expected = torch.stack([student[0, 1], student[0, 3], student[1, 0], student[1, 3]])
    torch.testing.assert_close(selected, expected)


def test_causal_lm_positions_are_shifted(batch):
    student, _, labels = batch
    selected = select_labelled_positions(student, labels, shift_labels=True)
    # Position t predicts label t+1: labels[0, 1] and labels[0, 3] -> positions 0 and 2; labels[1, 3] -> position 2.
    torch.testing.assert_close(selected, torch.stack([student[0, 0], student[0, 2], student[1, 2]]))


def test_one_label_per_example_keeps_every_example():
    logits = torch.randn(6, 10)
    assert select_labelled_positions(logits, torch.arange(6)).shape == (6, 10)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("loss_type,index", [("kl", 0), ("ce", 1)])
def test_value_matches_hand_computation(batch, loss_type, index, temperature):
    student, peer, labels = batch
    s, p = select_labelled_positions(student, labels), select_labelled_positions(peer, labels)
    value = distillation_loss(s, p, loss_type, temperature)
    assert value.item() == pytest.approx(_hand_losses(s, p, temperature)[index], rel=1e-6)


def test_mse_matches_hand_computation(batch):
    student, peer, labels = batch
    s, p = select_labelled_positions(student, labels), select_labelled_positions(peer, labels)
    expected = sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), p.flatten().tolist())) / s.numel()
    assert distillation_loss(s, p, "mse").item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss_type", ["kl", "ce"])
def test_gradient_is_softened_difference(batch, loss_type):
    # d/ds of T² · KL(q ‖ softmax(s/T)) / N is T · (softmax(s/T) − q) / N; the same for soft cross-entropy.
    student, peer, labels = batch
    temperature = 2.0
    s = select_labelled_positions(student, labels).clone().requires_grad_(True)
    p = select_labelled_positions(peer, labels)
    distillation_loss(s, p, loss_type, temperature).backward()
    difference = torch.softmax(s.detach() / temperature, -1) - torch.softmax(p / temperature, -1)
    expected = temperature * difference / len(s)
    torch.testing.assert_close(s.grad, expected.to(s.grad.dtype))


def test_peer_gets_no_gradient(batch):
    student, peer, labels = batch
    s = student.clone().requires_grad_(True)
    p = peer.clone().requires_grad_(True)
    distillation_loss(s.reshape(-1, 5), p.reshape(-1, 5), "kl").backward()
    assert s.grad is not None and p.grad is None


def test_kl_is_zero_for_identical_predictions(batch):
    student, _, _ = batch
    flat = student.reshape(-1, 5)
    assert distillation_loss(flat, flat, "kl").item() == pytest.approx(0, abs=1e-12)


def test_mismatched_output_spaces_name_both_shapes():
    with pytest.raises(ValueError, match="10 classes, its peer's 12"):
        distillation_loss(torch.randn(3, 10), torch.randn(3, 12))


@pytest.mark.parametrize("loss_type", ["kl", "ce"])
def test_chunked_soft_target_loss_matches_autograd_of_the_formula(loss_type, monkeypatch):
    """Split into chunks of 3 positions, value and gradient still equal plain autograd over the whole formula."""
    import hf_codistill.losses as losses

    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 3 * 7)
    torch.manual_seed(0)
    student = torch.randn(10, 7, dtype=torch.float64, requires_grad=True)
    peer = torch.randn(10, 7, dtype=torch.float64)
    temperature = 2.0
    value = losses.distillation_loss(student, peer, loss_type, temperature)
    (grad,) = torch.autograd.grad(value, student)

    reference_student = student.detach().clone().requires_grad_(True)
    log_q = torch.log_softmax(reference_student / temperature, -1)
    log_p = torch.log_softmax(peer / temperature, -1)
    per_position = (log_p.exp() * ((log_p if loss_type == "kl" else 0) - log_q)).sum(-1)
    expected = per_position.mean() * temperature**2
    (expected_grad,) = torch.autograd.grad(expected, reference_student)
    torch.testing.assert_close(value, expected.to(value.dtype))
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("loss_type", ["kl", "ce", "mse"])
def test_position_mask_equals_selecting_the_positions(batch, loss_type, monkeypatch):
    """Masking unscored positions (the causal-LM path, no copies of the logits) gives the value and gradient of
    selecting them first, also across chunks."""
    import hf_codistill.losses as losses

    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 3 * 5)
    student, peer, labels = batch
    mask = losses.label_mask(labels, shift_labels=True)
    masked_student = student.clone().requires_grad_(True)
    masked = losses.distillation_loss(masked_student.reshape(-1, 5), peer.reshape(-1, 5), loss_type, 2.0,
                                      position_mask=mask.reshape(-1))
    masked.backward()
    selected_student = student.clone().requires_grad_(True)
    selected = losses.distillation_loss(select_labelled_positions(selected_student, labels, shift_labels=True),
                                        select_labelled_positions(peer, labels, shift_labels=True), loss_type, 2.0)
    selected.backward()
    torch.testing.assert_close(masked, selected)
    torch.testing.assert_close(masked_student.grad, selected_student.grad)
    assert masked_student.grad[~mask].abs().max() == 0


def test_unscored_positions_cannot_poison_the_loss():
    """inf / NaN logits at masked positions (padding, overflow) leave the loss and the gradient finite."""
    import hf_codistill.losses as losses

    student = torch.randn(4, 6, requires_grad=True)
    peer = torch.randn(4, 6)
    peer[1] = float("nan")
    with torch.no_grad():
        student[3] = float("inf")
    mask = torch.tensor([True, False, True, False])
    for loss_type in ("kl", "ce", "mse"):
        student.grad = None
        value = losses.distillation_loss(student, peer, loss_type, 2.0, position_mask=mask)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(student.grad).all()
        assert student.grad[~mask].abs().max() == 0


def test_fp16_gradients_survive_a_large_loss_scale():
    """The backward factor (loss scale x T / N) stays in fp32: 65536 x 4 / 2 overflows fp16, the products do not."""
    student = torch.randn(2, 8, dtype=torch.float16, requires_grad=True)
    loss = distillation_loss(student, torch.randn(2, 8, dtype=torch.float16), "kl", 4.0)
    (loss * 65536).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().max() > 0


def test_mismatched_positions_are_refused():
    with pytest.raises(ValueError, match="peer's logits cover 4 positions, this model's 6"):
        distillation_loss(torch.randn(6, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="`position_mask` has 4 entries for 6 positions"):
        distillation_loss(torch.randn(6, 5), torch.randn(6, 5), position_mask=torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("causal_lm,peer_at_labels", [(False, False), (False, True), (True, False)])
def test_distillation_to_peers_is_the_mean_over_peers_at_the_scored_positions(batch, causal_lm, peer_at_labels):
    """Whole peers or peers already at the labelled positions; causal LMs masked, others gathered: same value."""
    student, peer, labels = batch
    other = peer.flip(-1)
    peers = [peer, other]
    if peer_at_labels:  # as `peer_logits_at_labels` gives them (causal LMs always take whole peers)
        peers = [select_labelled_positions(p, labels) for p in peers]
    value = distillation_to_peers(student, iter(peers), labels, causal_lm, "kl", 2.0)
    s = select_labelled_positions(student, labels, shift_labels=causal_lm)
    expected = [_hand_losses(s, select_labelled_positions(p, labels, shift_labels=causal_lm), 2.0)[0]
                for p in (peer, other)]
    assert value.item() == pytest.approx(sum(expected) / 2, rel=1e-9)


def test_causal_lm_logits_are_scored_whole_with_a_mask(batch):
    student, _, labels = batch
    mask = causal_lm_mask(student, labels, causal_lm=True)
    assert mask.tolist() == [True, False, True, False, False, False, True, False]
    assert causal_lm_mask(student, labels, causal_lm=False) is None


def test_soft_targets_on_a_single_output_are_refused():
    with pytest.raises(ValueError, match="single output.*codistill_loss='mse'"):
        distillation_loss(torch.randn(4, 1), torch.randn(4, 1), "kl")
    assert distillation_loss(torch.zeros(4, 1), torch.ones(4, 1), "mse").item() == 1.0


def test_sampled_positions_are_distinct_labelled_first_and_fixed_in_number():
    mask = torch.tensor([True, False, True, True, False, False, True, False])
    for _ in range(20):
        positions = sample_positions(mask, 0.5)
        assert positions.numel() == 4 and set(positions.tolist()) == {0, 2, 3, 6}
    positions = sample_positions(mask, 0.75)
    assert positions.numel() == 6 and len(set(positions.tolist())) == 6 and {0, 2, 3, 6} <= set(positions.tolist())
    assert sample_positions(mask, 1.0) is None and sample_positions(None, 0.5) is None


def test_distillation_at_sampled_positions_scores_those_rows(batch):
    """Whole peers or peers already at the positions: the term over the sampled rows (unlabelled ones masked)."""
    student, peer, labels = batch
    mask = causal_lm_mask(student, labels, causal_lm=True)
    positions = torch.tensor([6, 0, 1])  # two scored positions and one without a label
    flat_student, flat_peer = student.reshape(-1, 5), peer.reshape(-1, 5)
    expected = _hand_losses(flat_student[[6, 0]], flat_peer[[6, 0]], 1.0)[0]
    for peers in ([peer], [flat_peer[positions]]):
        value = distillation_to_peers(student, peers, labels, True, "kl", 1.0, positions)
        assert value.item() == pytest.approx(expected, rel=1e-9)
    assert mask[positions].tolist() == [True, True, False]


@pytest.mark.parametrize("loss_type", ["kl", "ce", "mse"])
def test_peers_in_row_blocks_give_the_mean_over_peers_of_the_whole_term(loss_type, monkeypatch):
    """Three peers scored in one pass, each made in blocks of 4 rows that chunks of 3 cut across, with unscored
    positions: the value and gradient of the mean over peers of plain autograd on whole logits."""
    import hf_codistill.losses as losses

    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 3 * 7)
    torch.manual_seed(0)
    student = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    peers = [torch.randn(2, 5, 7, dtype=torch.float64) for _ in range(3)]
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 2] = labels[1, 4] = -100
    made = []

    def blocks(peer):
        earlier = []
        for start in range(0, 10, 4):
            made.append(start)
            if loss_type != "mse":  # (mse concatenates them)
                # The loss has dropped this peer's earlier blocks before it asks for the next one.
                assert all(block() is None for block in earlier)
            block = peer.reshape(-1, 7)[start:start + 4]
            earlier.append(weakref.ref(block))
            yield block
            del block

    value = distillation_to_peers(student, [blocks(p) for p in peers], labels, True, loss_type, 2.0)
    (grad,) = torch.autograd.grad(value, student)
    # An independent reference: plain autograd over the whole formula, at the positions with a next-token label.
    reference = student.detach().clone().requires_grad_(True)
    scored = torch.cat([labels[:, 1:] != -100, torch.zeros(2, 1, dtype=torch.bool)], dim=1).reshape(-1)
    flat = reference.reshape(-1, 7)[scored]
    per_peer = []
    for p in peers:
        p = p.reshape(-1, 7)[scored]
        if loss_type == "mse":
            per_peer.append((flat - p).pow(2).mean())
            continue
        log_q, log_p = torch.log_softmax(flat / 2.0, -1), torch.log_softmax(p / 2.0, -1)
        per_peer.append(4.0 * (log_p.exp() * ((log_p if loss_type == "kl" else 0) - log_q)).sum(-1).mean())
    expected = torch.stack(per_peer).mean()
    (expected_grad,) = torch.autograd.grad(expected, reference)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert sorted(made) == [0, 0, 0, 4, 4, 4, 8, 8, 8]


def test_peer_blocks_that_do_not_cover_the_positions_are_refused(batch):
    student, peer, labels = batch
    flat = peer.reshape(-1, 5)
    with pytest.raises(ValueError, match="peer's logits cover 6 positions, this model's 8"):
        distillation_to_peers(student, [iter([flat[:3], flat[3:6]])], labels, True)
    with pytest.raises(ValueError, match="cover 12 positions, this model's 8"):
        distillation_to_peers(student, [iter([flat, flat[:4]])], labels, True)
    with pytest.raises(TypeError, match="only taken for causal LMs scored at every position"):
        distillation_to_peers(student, [iter([flat])], labels, False)


def test_a_masked_lm_at_sampled_positions_scores_its_labelled_ones_among_them(batch):
    """MLM labels are not shifted: of positions [1, 0, 7, 2], rows 1 and 7 carry a label and are scored."""
    student, peer, labels = batch
    positions = torch.tensor([1, 0, 7, 2])
    flat_student, flat_peer = student.reshape(-1, 5), peer.reshape(-1, 5)
    expected = _hand_losses(flat_student[[1, 7]], flat_peer[[1, 7]], 2.0)[0]
    for peers in ([peer], [flat_peer[positions]]):
        value = distillation_to_peers(student, peers, labels, False, "kl", 2.0, positions)
        assert value.item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="need a label per position"):
        distillation_to_peers(torch.randn(4, 3), [torch.randn(4, 3)], torch.arange(4) % 3, False, "kl", 1.0,
                              torch.tensor([0, 1]))
