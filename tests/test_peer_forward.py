"""The peer's head runs on the labelled positions only, and gives exactly the logits a full forward selects."""

import contextlib
import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

from hf_codistill import CodistillTrainer, CodistillTrainingArguments, peer_forward
from hf_codistill.engine import CodistillEngine
from hf_codistill.local_peers import LocalPeers
from hf_codistill.losses import distillation_loss, flat_label_mask, sample_positions, select_labelled_positions
from hf_codistill.peer_forward import peer_logits_at_labels, peer_logits_at_positions


def _bert():
    return BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64)), False


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                      eos_token_id=0)), True


def _engine_with_a_peer(build, tmp_path, **args):
    """The codistillation engine of a new `build()` model (group 0) with one peer of the same kind (group 1)."""
    torch.manual_seed(0)
    student, causal = build()
    peer, _ = build()
    peer.eval()
    engine = CodistillEngine(CodistillTrainingArguments(str(tmp_path), use_cpu=True, report_to="none", **args),
                             driver=None, autocast=contextlib.nullcontext)
    engine.models = {0: student}
    engine.peers = LocalPeers({0: student, 1: peer}, live=True)
    return student, peer, causal, engine


@pytest.mark.parametrize("build", [_bert, _gpt2])
def test_head_at_labelled_positions_matches_full_forward(build):
    torch.manual_seed(0)
    model, causal = build()
    model.eval()
    ids = torch.randint(0, 100, (3, 12))
    labels = torch.where(torch.rand(3, 12) < 0.3, ids, torch.full_like(ids, -100))
    projected = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, out: projected.append(out.shape))
    with torch.no_grad():
        selected = peer_logits_at_labels(model, {"input_ids": ids}, labels, shift_labels=causal)
        handle.remove()
        full = select_labelled_positions(model(input_ids=ids).logits, labels, shift_labels=causal)
    torch.testing.assert_close(selected, full)  # equal up to the matmul blocking of fewer rows
    # The vocabulary projection ran on the scored positions only.
    assert projected[0] == (full.shape[0], 100)


def test_classifiers_run_whole():
    model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                                num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    model.eval()
    pixels, labels = torch.randn(4, 1, 8, 8), torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        assert torch.equal(peer_logits_at_labels(model, {"pixel_values": pixels}, labels, shift_labels=False),
                           model(pixel_values=pixels).logits)


@pytest.mark.parametrize("build", [_bert, _gpt2])
def test_trainer_distillation_term_scores_the_labelled_positions(build, tmp_path):
    """The trainer's term (MLM: gathered positions; causal LM: all positions, unlabelled ones masked) equals the
    distillation loss between the full forwards at the labelled positions."""
    student, peer, causal, engine = _engine_with_a_peer(build, tmp_path)
    ids = torch.randint(0, 100, (3, 12))
    labels = torch.where(torch.rand(3, 12) < 0.5, ids, torch.full_like(ids, -100))
    outputs = student(input_ids=ids)
    term = engine.distillation_term(0, outputs.logits, {"input_ids": ids}, labels)
    with torch.no_grad():
        expected = distillation_loss(select_labelled_positions(outputs.logits, labels, causal),
                                     select_labelled_positions(peer(input_ids=ids).logits, labels, causal))
    torch.testing.assert_close(term, expected)


def test_head_at_sampled_positions_matches_full_forward():
    torch.manual_seed(0)
    model, _ = _gpt2()
    model.eval()
    ids = torch.randint(0, 100, (3, 12))
    positions = torch.tensor([35, 0, 17, 4])
    projected = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, out: projected.append(out.shape))
    with torch.no_grad():
        sampled = peer_logits_at_positions(model, {"input_ids": ids}, positions, ids.shape)
        handle.remove()
        full = model(input_ids=ids).logits.reshape(-1, 100)[positions]
    torch.testing.assert_close(sampled, full)
    assert projected[0] == (4, 100)


@pytest.mark.parametrize("build,fraction,labelled", [(_gpt2, 0.5, 0.9), (_bert, 0.2, 0.15)])
def test_trainer_scores_a_language_model_at_sampled_positions(build, fraction, labelled, tmp_path):
    """`codistill_position_fraction`: the term over the positions `sample_positions` draws (unlabelled ones masked),
    with the peer's head on those only; for MLM a fixed count above the masking rate instead of a gather."""
    student, peer, causal, engine = _engine_with_a_peer(build, tmp_path, codistill_position_fraction=fraction)
    ids = torch.randint(0, 100, (3, 12))
    labels = torch.where(torch.rand(3, 12) < labelled, ids, torch.full_like(ids, -100))
    outputs = student(input_ids=ids)
    projected = []
    handle = peer.get_output_embeddings().register_forward_hook(lambda m, i, out: projected.append(out.shape))
    torch.manual_seed(7)
    term = engine.distillation_term(0, outputs.logits, {"input_ids": ids}, labels)
    handle.remove()
    torch.manual_seed(7)
    mask = flat_label_mask(outputs.logits, labels, causal)
    positions = sample_positions(mask, fraction)
    assert positions.numel() == math.ceil(fraction * 36) and projected == [(positions.numel(), 100)]
    with torch.no_grad():
        expected = distillation_loss(outputs.logits.reshape(-1, 100)[positions],
                                     peer(input_ids=ids).logits.reshape(-1, 100)[positions],
                                     position_mask=mask[positions])
    torch.testing.assert_close(term, expected)


def test_a_causal_peer_scored_whole_runs_a_slice_of_the_batch_at_a_time(tmp_path, monkeypatch):
    """With room for 2 sequences' logits, a batch of 5 runs the peer on 2 + 2 + 1 sequences (with their attention
    masks), each slice as the loss scores it; the term equals the one between the whole forwards."""
    monkeypatch.setattr(peer_forward, "PEER_LOGITS_PER_SLICE", 2 * 12 * 100)
    student, peer, _, engine = _engine_with_a_peer(_gpt2, tmp_path)
    ids = torch.randint(0, 100, (5, 12))
    attention_mask = torch.ones_like(ids)
    attention_mask[3, 9:] = 0
    labels = torch.where(attention_mask.bool(), ids, torch.full_like(ids, -100))
    inputs = {"input_ids": ids, "attention_mask": attention_mask}
    outputs = student(**inputs)
    slices = []
    handle = peer.register_forward_pre_hook(
        lambda module, args, kwargs: slices.append((kwargs["input_ids"].shape[0], torch.is_grad_enabled())),
        with_kwargs=True)
    term = engine.distillation_term(0, outputs.logits, inputs, labels)
    handle.remove()
    assert slices == [(2, False), (2, False), (1, False)]
    with torch.no_grad():
        expected = distillation_loss(select_labelled_positions(outputs.logits, labels, True),
                                     select_labelled_positions(peer(**inputs).logits, labels, True))
    torch.testing.assert_close(term, expected)
    term.backward()
    assert student.transformer.wte.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("build,fraction", [(_gpt2, 0.5), (_bert, 0.2), (_gpt2, 1.0), (_bert, 1.0)])
def test_one_process_peers_compute_only_what_the_term_scores(build, fraction, tmp_path):
    """The list-of-models trainer scores like the distributed one, and its peers' heads run only where it scores:
    at the sampled positions, at a masked LM's masked tokens, at every position of a causal LM."""
    torch.manual_seed(0)
    student, causal = build()
    peer, _ = build()
    args = CodistillTrainingArguments(str(tmp_path), use_cpu=True, report_to="none", codistill=True,
                                      codistill_position_fraction=fraction, codistill_sync_every=1)
    trainer = CodistillTrainer(model=[student, peer], args=args)
    trainer.engine.start(0)
    ids = torch.randint(0, 100, (3, 12))
    labels = torch.where(torch.rand(3, 12) < 0.3, ids, torch.full_like(ids, -100))
    logits = student(input_ids=ids).logits
    projected = []
    handle = peer.get_output_embeddings().register_forward_hook(lambda m, i, out: projected.append(out.shape))
    torch.manual_seed(7)
    term = trainer.engine.distillation_term(0, logits, {"input_ids": ids}, labels)
    handle.remove()
    assert peer.training  # the live peer ran in eval mode and was put back
    torch.manual_seed(7)
    mask = flat_label_mask(logits, labels, causal)
    peer.eval()
    with torch.no_grad():
        peer_logits = peer(input_ids=ids).logits
    if fraction < 1:
        positions = sample_positions(mask, fraction)
        expected = distillation_loss(logits.reshape(-1, 100)[positions], peer_logits.reshape(-1, 100)[positions],
                                     position_mask=mask[positions])
        assert projected == [(positions.numel(), 100)]
    else:
        expected = distillation_loss(select_labelled_positions(logits, labels, causal),
                                     select_labelled_positions(peer_logits, labels, causal))
        assert projected == [(3, 12, 100)] if causal else [(int(mask.sum()), 100)]
    torch.testing.assert_close(term, expected)


def test_slices_cut_only_per_token_inputs(monkeypatch):
    """A 1-D `position_ids` as long as the batch is passed whole to every slice, a 4-D attention mask is sliced; the
    slices join into the whole logits; an empty batch has no slices."""
    monkeypatch.setattr(peer_forward, "PEER_LOGITS_PER_SLICE", 2 * 8 * 100)
    torch.manual_seed(0)
    model, _ = _gpt2()
    model.eval()
    inputs = {"input_ids": torch.randint(0, 100, (8, 8)), "attention_mask": torch.ones(8, 1, 8, 8).tril().bool(),
              "position_ids": torch.arange(8), "use_cache": False}
    with torch.no_grad():
        blocks = list(peer_forward.peer_logits_in_slices(model, inputs, (8, 8), 100, torch.no_grad))
        whole = model(**inputs).logits
    assert [block.shape[0] for block in blocks] == [16] * 4
    torch.testing.assert_close(torch.cat(blocks), whole.reshape(-1, 100))
    assert list(peer_forward.peer_logits_in_slices(model, inputs, (0, 8), 100, torch.no_grad)) == []
