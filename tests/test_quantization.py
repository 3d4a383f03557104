"""8-bit peers (`codistill_peer_dtype="int8"`): weight matrices held as int8 rows with a scale each, tied weights kept
tied, predictions close to the model's, refreshed by copying in one process and trained with by the trainer."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, set_seed

from hf_codistill import CodistillTrainer, CodistillTrainingArguments
from hf_codistill.exchange import exchanged_tensors, frozen_copy, new_peer
from hf_codistill.local_peers import LocalPeers
from hf_codistill.quantization import SCALE_SUFFIX, as_sent, quantize_rows
from tests.scripts.train_digits import digits_dataset, tiny_vit


def tiny_gpt2(seed=0):
    set_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=512, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_an_int8_peer_holds_a_quarter_keeps_ties_and_predicts_like_its_model():
    model = tiny_gpt2().eval()
    peer = frozen_copy(model, torch.int8)
    stored = peer.transformer.wte.parametrizations.weight.original
    assert stored.dtype == torch.int8 and stored is peer.lm_head.parametrizations.weight.original  # still tied
    wire = exchanged_tensors(peer)
    own = exchanged_tensors(model)
    assert [name for name in wire if not name.endswith(SCALE_SUFFIX)] == list(own)
    assert {str(t.dtype) for name, t in wire.items() if t.dim() >= 2} == {"torch.int8"}
    assert nbytes(wire) < 0.28 * nbytes(own)  # a quarter, plus row scales, biases and norms: 27 % here
    ids = torch.randint(0, 512, (4, 32))
    with torch.no_grad():
        expected, got = model(ids).logits.log_softmax(-1), peer(ids).logits.log_softmax(-1)
    # KL(model || int8 peer) per token is a small fraction of a nat.
    assert (expected.exp() * (expected - got)).sum(-1).mean() < 1e-3
    # A dequantised weight is within half a row's scale of the model's.
    weight, dequantised = model.transformer.h[0].mlp.c_fc.weight, peer.transformer.h[0].mlp.c_fc.weight
    _, scale = quantize_rows(weight)
    assert ((weight - dequantised).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_int8_copies_in_one_process_follow_their_models():
    models = {0: tiny_gpt2(0), 1: tiny_gpt2(1)}
    peers = LocalPeers(models, live=False, dtype=torch.int8)
    with torch.no_grad():
        models[1].transformer.h[1].attn.c_attn.weight.mul_(3.0)
    peers.refresh(step=1)
    expected = as_sent(exchanged_tensors(models[1]), exchanged_tensors(peers.model(1)))
    assert all(torch.equal(expected[name], tensor) for name, tensor in exchanged_tensors(peers.model(1)).items())
    # Checkpoints hold the int8 rows and scales; loading them restores the copy exactly.
    state = peers.state_dict(0)
    assert state["group_1.transformer.wte.weight"].dtype == torch.int8
    reloaded = LocalPeers({0: tiny_gpt2(0), 1: tiny_gpt2(5)}, live=False, dtype=torch.int8)
    reloaded.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(exchanged_tensors(reloaded.model(1)).values(),
                                                 exchanged_tensors(peers.model(1)).values()))


def test_the_trainer_distils_from_int8_peers(tmp_path):
    train, _ = digits_dataset(64)
    args = CodistillTrainingArguments(output_dir=str(tmp_path), codistill=True, num_groups=2, max_steps=4,
                                      codistill_sync_every=2, codistill_peer_dtype="int8", learning_rate=1e-3,
                                      per_device_train_batch_size=16, logging_steps=1, report_to="none",
                                      use_cpu=True, save_strategy="no")
    trainer = CodistillTrainer(model=[tiny_vit(), tiny_vit()], args=args, train_dataset=train)
    trainer.train()
    copies = trainer.peers.copies
    assert all(t.dtype == torch.int8 for c in copies for t in exchanged_tensors(c).values() if t.dim() >= 2)
    assert {p.dtype for model in trainer.models for p in model.parameters()} == {torch.float32}
    distill = [entry["group_1/distill_loss"] for entry in trainer.state.log_history if "group_1/distill_loss" in entry]
    assert len(distill) == 4 and all(0 < value < 10 for value in distill)


def test_int8_is_refused_for_adapters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    for make in (new_peer, frozen_copy):
        with pytest.raises(ValueError, match="adapter is small"):
            make(model, 1, torch.int8) if make is new_peer else make(model, torch.int8)
