"""PEFT groups: peers held as adapters on the group's own base (not copies of the model), adapters alone exchanged,
the base compared across groups, only the group's own adapter saved; real launches of 2 groups x 2 processes."""

import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from hf_codistill import CodistillTrainer, CodistillTrainingArguments
from hf_codistill.adapters import (
    AdapterPeer,
    add_adapter_peer,
    base_fingerprint,
    own_adapter_tensors,
    saving_own_adapter_only,
)
from hf_codistill.exchange import exchanged_tensors, new_peer
from hf_codistill.local_peers import LocalPeers
from tests.conftest import SCRIPTS
from tests.scripts.train_digits import digits_dataset, tiny_vit

SCRIPT = SCRIPTS / "train_digits.py"
COMMON = ["--per_device_train_batch_size", "16", "--max_steps", "8", "--logging_steps", "2", "--report_to", "none",
          "--learning_rate", "1e-2", "--seed", "42", "--codistill", "--num_groups", "2", "--codistill_sync_every", "3"]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])


def lora_vit(seed=0):
    torch.manual_seed(seed)
    return get_peft_model(tiny_vit(), LORA)


def test_a_peer_is_an_adapter_on_the_same_base():
    model = lora_vit()
    before = sum(p.numel() for p in model.parameters())
    peer = new_peer(model, 1)
    assert isinstance(peer, AdapterPeer) and model.active_adapter == "default"
    adapter = own_adapter_tensors(model)
    # The peer costs one adapter (LoRA factors and the classifier's trainable copy), and lists the same keys.
    assert sum(p.numel() for p in model.parameters()) - before == sum(t.numel() for t in adapter.values())
    assert list(peer.tensors()) == list(adapter) == list(exchanged_tensors(model))
    assert all(not t.requires_grad for t in peer.tensors().values())
    assert all(t.requires_grad for t in adapter.values())
    # With the student's adapter copied in, the peer computes what the student computes (in eval mode).
    with torch.no_grad():
        for target, source in zip(peer.tensors().values(), adapter.values()):
            target.copy_(source + 0.01 * torch.randn_like(source))
    pixels = torch.rand(3, 1, 8, 8)
    model.train()
    logits = peer(pixel_values=pixels).logits
    assert model.training  # put back
    model.eval()
    model.set_adapter("codistill_peer_1")
    expected = model(pixel_values=pixels).logits
    model.set_adapter("default")
    assert torch.allclose(logits, expected)
    assert not torch.allclose(logits, model(pixel_values=pixels).logits)


def test_the_base_fingerprint_ignores_adapters_and_sees_the_base():
    model, same, other = lora_vit(0), lora_vit(0), lora_vit(1)
    add_adapter_peer(model, 1)
    with torch.no_grad():
        next(iter(own_adapter_tensors(model).values())).add_(1.0)
    assert base_fingerprint(model) == base_fingerprint(same) != base_fingerprint(other)


def test_only_the_students_adapter_is_saved(tmp_path):
    model = lora_vit()
    add_adapter_peer(model, 1, dtype=torch.bfloat16)
    with saving_own_adapter_only(model):
        model.save_pretrained(tmp_path)
    assert set(model.peft_config) == {"default", "codistill_peer_1"}
    assert not (tmp_path / "codistill_peer_1").exists()
    reloaded = PeftModel.from_pretrained(tiny_vit_at(0), tmp_path)
    assert set(reloaded.peft_config) == {"default"}


def test_a_resumed_run_shares_the_base_again_and_keeps_each_adapter():
    """In one process (`LocalPeers`), as launched: `share_initialisation(base_only=True)` copies model 0's base into
    every model (a head `from_pretrained` initialised at random differs per seed) and leaves the adapters alone."""
    models = {0: lora_vit(0), 1: lora_vit(1)}
    adapter = {name: t.clone() for name, t in own_adapter_tensors(models[1]).items()}
    LocalPeers(models, live=False).share_initialisation(base_only=True)
    assert base_fingerprint(models[0]) == base_fingerprint(models[1])
    assert all(torch.equal(adapter[name], t) for name, t in own_adapter_tensors(models[1]).items())


def test_a_list_of_models_with_peft_config_trains_in_one_process(tmp_path):
    """`peft_config=` with a list of models: each model gets its adapters (on its own base) and saves them alone."""
    train, evaluation = digits_dataset(128)
    args = CodistillTrainingArguments(output_dir=str(tmp_path), codistill=True, num_groups=2, codistill_sync_every=2,
                                      max_steps=4, per_device_train_batch_size=16, learning_rate=1e-2, report_to=[],
                                      save_strategy="no")
    trainer = CodistillTrainer(model=[tiny_vit_at(1234), tiny_vit_at(1234)], args=args, train_dataset=train,
                               eval_dataset=evaluation, peft_config=LORA)
    trainer.train()
    assert all(isinstance(model, PeftModel) for model in trainer.models)
    assert 0 <= trainer.evaluate()["eval_agreement_0_1"] <= 1
    trainer.save_model()
    model = PeftModel.from_pretrained(tiny_vit_at(1234), tmp_path, subfolder="group_1")
    assert set(model.peft_config) == {"default"}


def tiny_vit_at(seed):
    torch.manual_seed(seed)
    return tiny_vit()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, launcher):
    root = tmp_path_factory.mktemp("lora")
    ranks = launcher(SCRIPT, 4, [*COMMON, "--output_dir", str(root / "out"), "--save_steps", "4", "--x-save=1",
                                 "--x-lora=shared_base"], root / "results")
    return root, ranks


def test_groups_exchange_their_adapters_only(lora_run):
    root, ranks = lora_run
    adapter_bytes = sum(t.numel() * t.element_size() for t in own_adapter_tensors(lora_vit()).values())
    own = {r["group_index"]: {s["step"]: s["own_exchanged"] for s in r["steps"]} for r in ranks}
    for rank in ranks:
        peer_group = 1 - rank["group_index"]
        history = {s["step"]: s["peers"][str(peer_group)] for s in rank["steps"]}
        assert [step for step in range(2, 9) if history[step] != history[step - 1]] == [3, 6]
        assert history[3] == own[peer_group][3] and history[6] == own[peer_group][6]
        counters = [entry for entry in rank["log_history"] if "peer_exchanges" in entry][-1]
        # 3 exchanges (the start, steps 3 and 6); each rank sends half of the adapter (sharded over 2 ranks).
        assert counters["peer_exchanges"] == 3
        assert counters["peer_exchange_bytes_sent"] == pytest.approx(3 * adapter_bytes / 2, abs=3 * 4)
        assert "eval_agreement_0_1" in rank["eval"]
    # Each group trained its own adapter; the frozen base is the same everywhere.
    assert ranks[0]["final_params"] == ranks[1]["final_params"] != ranks[2]["final_params"]


def test_each_group_saves_its_adapter_in_peft_format(lora_run):
    root, _ = lora_run
    for group in (0, 1):
        folder = root / "out" / f"group_{group}"
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "codistill_peer_0").exists()
        model = PeftModel.from_pretrained(tiny_vit_at(1234), root / "out", subfolder=f"group_{group}")
        assert set(model.peft_config) == {"default"}


@pytest.mark.slow  # a second 4-process launch
def test_a_resumed_lora_run_continues_exactly(lora_run, tmp_path, launcher):
    root, ranks = lora_run
    resumed_out = tmp_path / "out"
    shutil.copytree(root / "out", resumed_out)
    for group in (0, 1):
        shutil.rmtree(resumed_out / f"group_{group}" / "checkpoint-8")
    resumed = launcher(SCRIPT, 4, [*COMMON, "--output_dir", str(resumed_out), "--save_steps", "4",
                                   "--x-lora=shared_base", "--x-resume=true"], tmp_path / "results")
    for before, after in zip(ranks, resumed):
        assert after["final_params"] == before["final_params"]
        assert [s["peers"] for s in after["steps"]] == [s["peers"] for s in before["steps"][4:]]


def test_groups_on_different_bases_are_refused(tmp_path, launcher):
    output = launcher(SCRIPT, 2, [*COMMON, "--output_dir", str(tmp_path / "out"), "--x-lora=own_base"],
                      tmp_path / "results", expect_failure=True)
    assert "hold other base weights than group 0" in output


def test_adapters_on_some_groups_only_are_refused(tmp_path, launcher):
    output = launcher(SCRIPT, 2, [*COMMON, "--output_dir", str(tmp_path / "out"), "--x-lora=group_1_only"],
                      tmp_path / "results", expect_failure=True)
    assert "Groups [1] train adapters (PEFT) and the others whole models" in output
