"""The private `Trainer` hooks hf_codistill relies on exist, with the parameters it uses, in the installed
transformers; the workarounds do what they claim."""

import inspect

import pytest
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, Trainer

from hf_codistill import OneProcessCodistillTrainer, compat
from hf_codistill.one_process_saving import PerModelSaving
from hf_codistill.trainer import CodistillTrainer


@pytest.mark.parametrize("name", sorted(compat.PRIVATE_TRAINER_HOOKS))
def test_every_private_hook_exists_with_the_parameters_used(name):
    parameters, _, _ = compat.PRIVATE_TRAINER_HOOKS[name]
    assert hasattr(Trainer, name), f"Trainer.{name} is gone: see hf_codistill.compat.PRIVATE_TRAINER_HOOKS"
    assert set(parameters) <= set(inspect.signature(getattr(Trainer, name)).parameters)


def test_the_table_names_every_private_trainer_method_the_drivers_override():
    overridden = {
        name for cls in (CodistillTrainer, OneProcessCodistillTrainer, PerModelSaving) for name in vars(cls)
        if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)
    }
    assert overridden <= set(compat.PRIVATE_TRAINER_HOOKS)


def test_loss_accounting_is_aligned_for_models_that_need_it():
    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    compat.align_loss_accounting(bert)
    compat.align_loss_accounting(gpt2)
    assert bert.accepts_loss_kwargs is False  # its forward ignores `num_items_in_batch`
    assert gpt2.loss_type == "ForCausalLM"
