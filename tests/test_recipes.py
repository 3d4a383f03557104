"""The recipes end to end on their built-in offline data, codistilled under a launcher and plain, and their errors."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)

from hf_codistill.metrics import metric_path
from hf_codistill.recipes.data import fashion_mnist_available, gpt2_bpe_tokenizer, load_bbc_news, minilm_path
from tests.conftest import REPO, launch

RECIPES = REPO / "recipes"
COMMON = ["--do_train", "--do_eval", "--max_steps", "6", "--logging_steps", "3", "--report_to", "none",
          "--max_eval_samples", "32"]
ARGS = {
    "run_image_classification.py": ["--per_device_train_batch_size", "16", "--learning_rate", "1e-3",
                                    "--max_train_samples", "256"],
    "run_mlm.py": ["--per_device_train_batch_size", "4", "--max_seq_length", "32", "--max_train_samples", "64"],
    "run_clm.py": ["--per_device_train_batch_size", "4", "--max_seq_length", "32", "--max_train_samples", "64",
                   "--config_overrides", "n_embd=32,n_layer=2,n_head=2", "--learning_rate", "1e-3"],
}
MODEL_CLASS = {"run_image_classification.py": AutoModelForImageClassification, "run_mlm.py": AutoModelForMaskedLM,
               "run_clm.py": AutoModelForCausalLM}
DATA = {"run_image_classification.py": "digits (built in, offline)", "run_mlm.py": "shakespeare (built in, offline)",
        "run_clm.py": "shakespeare (built in, offline)"}


def _import_recipe(name):
    sys.path.insert(0, str(RECIPES))
    return __import__(name)


@pytest.mark.parametrize("recipe", sorted(ARGS))
def test_recipe_codistilled_under_accelerate(recipe, tmp_path):
    out = tmp_path / "out"
    output = launch(RECIPES / recipe, 4, [*COMMON, *ARGS[recipe], "--codistill", "--num_groups", "2",
                                          "--codistill_sync_every", "2", "--output_dir", str(out), "--save_steps", "3",
                                          "--save_total_limit", "1"], None, launcher="accelerate")
    assert f"Training data: {DATA[recipe]}" in output
    for group in (0, 1):
        folder = out / f"group_{group}"
        model = MODEL_CLASS[recipe].from_pretrained(folder)
        results = json.loads((folder / "eval_results.json").read_text())
        assert "eval_loss" in results and 0 <= results["eval_accuracy"] <= 1
        assert "group_1/eval_loss" not in results
        if recipe != "run_image_classification.py":
            assert results["perplexity"] > 1
        card = (folder / "README.md").read_text()
        assert "- codistillation" in card and "| groups (models) G | 2 |" in card
        assert f"| peers | group_{1 - group} |" in card and f"| data | {DATA[recipe]} |" in card
        assert f"| eval_loss | {results['eval_loss']:.4g} |" in card
        if recipe == "run_mlm.py":  # all-MiniLM-L6-v2, from its offline copy
            assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
        else:
            assert "This model was trained from scratch on" in card and "base_model" not in card
        assert (folder / "checkpoint-6" / "codistill_state.json").is_file()
        # save_total_limit=1: step 3 is dropped once every group has completed step 6.
        assert not (folder / "checkpoint-3").exists()
        assert (folder / "train_results.json").is_file() and (folder / "trainer_state.json").is_file()
        assert 0 <= results["eval_agreement_0_1"] == results["eval_agreement_mean"] <= 1
        assert 0 <= results["eval_ensemble_accuracy"] <= 1 and results["eval_ensemble_loss"] > 0
    assert type(MODEL_CLASS[recipe].from_pretrained(out)) is type(model)
    history = json.loads((out / "group_0" / "trainer_state.json").read_text())["log_history"]
    assert any("group_1/distill_loss" in entry for entry in history)
    if recipe == "run_image_classification.py":
        _check_peer_metrics_by_hand(out)


def _check_peer_metrics_by_hand(out):
    """Re-score the two saved ViTs on the same 32 held-out digits in one process: ensemble and agreement match."""
    from hf_codistill.recipes.data import load_digits_dataset
    from hf_codistill.recipes.images import ImageTransform

    images = load_digits_dataset()["validation"].select(range(32))
    transform = ImageTransform([0.5], [0.5], 8, 1)
    pixels = torch.stack([transform(image, train=False) for image in images["image"]])
    labels = torch.tensor(images["label"])
    with torch.no_grad():
        models = [AutoModelForImageClassification.from_pretrained(out / f"group_{g}").eval() for g in (0, 1)]
        logits = [model(pixel_values=pixels).logits for model in models]
    probabilities = (logits[0].softmax(-1) + logits[1].softmax(-1)) / 2
    reported = json.loads((out / "group_0" / "eval_results.json").read_text())
    agreement = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean().item()
    assert reported["eval_agreement_0_1"] == pytest.approx(agreement)
    ensemble_accuracy = (probabilities.argmax(-1) == labels).float().mean().item()
    assert reported["eval_ensemble_accuracy"] == pytest.approx(ensemble_accuracy)
    assert reported["eval_ensemble_loss"] == pytest.approx(
        torch.nn.functional.nll_loss(probabilities.log(), labels).item(), rel=1e-4)


@pytest.mark.parametrize("recipe", sorted(ARGS))
def test_recipe_plain_trainer(recipe, tmp_path):
    out = tmp_path / "plain"
    proc = subprocess.run([sys.executable, str(RECIPES / recipe), *COMMON, *ARGS[recipe], "--use_cpu",
                           "--output_dir", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Training data: {DATA[recipe]}" in proc.stdout + proc.stderr
    assert json.loads((out / "eval_results.json").read_text())["eval_accuracy"] >= 0
    assert "codistillation" not in (out / "README.md").read_text()
    assert not (out / "group_0").exists()


@pytest.mark.parametrize("recipe", ["run_image_classification.py", "run_clm.py"])
def test_recipe_codistilled_in_one_process(recipe, tmp_path):
    """`--codistill` without a launcher trains all G models side by side in the one process."""
    out = tmp_path / "one"
    proc = subprocess.run([sys.executable, str(RECIPES / recipe), *COMMON, *ARGS[recipe], "--codistill",
                           "--codistill_sync_every", "2", "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "One process: training all 2 codistilled models in it." in proc.stdout + proc.stderr
    assert json.loads((out / "codistill.json").read_text())["one_process"] is True
    results = [json.loads((out / f"group_{g}" / "eval_results.json").read_text()) for g in (0, 1)]
    assert results[0]["eval_loss"] != results[1]["eval_loss"]  # each model's own metrics in its folder
    assert results[1]["eval_loss"] == results[0]["group_1/eval_loss"]
    assert all(0 <= r["eval_accuracy"] <= 1 and 0 <= r["eval_agreement_mean"] <= 1 for r in results)
    if recipe == "run_clm.py":
        assert [r["perplexity"] for r in results] == pytest.approx([math.exp(r["eval_loss"]) for r in results])
    assert "train_loss" in json.loads((out / "group_0" / "train_results.json").read_text())
    assert "train_loss" not in json.loads((out / "group_1" / "train_results.json").read_text())
    models = [MODEL_CLASS[recipe].from_pretrained(out / f"group_{g}") for g in (0, 1)]
    # Built under seeds 42 and 43: the two models started, and ended, apart.
    assert not torch.equal(next(models[0].parameters()), next(models[1].parameters()))
    assert "Codistillation" in (out / "group_1" / "README.md").read_text()


@pytest.mark.slow
def test_clm_recipe_with_use_peft_in_one_process_trains_adapters_of_one_base(tmp_path):
    """`--codistill --use_peft` without a launcher: one GPT-2, two LoRA students on it, each saved as an adapter."""
    out = tmp_path / "lora"
    proc = subprocess.run([sys.executable, str(RECIPES / "run_clm.py"), *COMMON, *ARGS["run_clm.py"], "--codistill",
                           "--codistill_sync_every", "2", "--use_peft", "--lora_r", "4", "--lora_target_modules",
                           "c_attn", "--output_dir", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "One process: training 2 codistilled adapters of one base model in it." in proc.stdout + proc.stderr
    for group in (0, 1):
        saved = {path.name for path in (out / f"group_{group}").iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json"} <= saved
        assert not (out / f"group_{group}" / "model.safetensors").exists()
    results = [json.loads((out / f"group_{g}" / "eval_results.json").read_text()) for g in (0, 1)]
    assert all(math.isfinite(r["eval_loss"]) and 0 <= r["eval_agreement_mean"] <= 1 for r in results)


def _run_main(recipe, monkeypatch, *args):
    module = _import_recipe(recipe)
    monkeypatch.setattr(sys, "argv", [f"{recipe}.py", *args])
    module.main()


def test_unknown_label_column_is_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="Column 'digit' is not in the data set.*--label_column_name"):
        _run_main("run_image_classification", monkeypatch, *COMMON, "--use_cpu", "--output_dir", str(tmp_path),
                  "--label_column_name", "digit")


def test_unknown_text_column_is_named(tmp_path, monkeypatch):
    train = tmp_path / "lines.csv"
    train.write_text("line\nTo be, or not to be\nthat is the question\n")
    with pytest.raises(ValueError, match="Column 'text' is not in the data set.*--text_column_name"):
        _run_main("run_clm", monkeypatch, "--do_train", "--use_cpu", "--output_dir", str(tmp_path / "out"),
                  "--train_file", str(train), "--text_column_name", "text")


def test_evaluation_without_validation_split_is_refused(tmp_path, monkeypatch):
    train = tmp_path / "lines.txt"
    train.write_text("To be, or not to be\nthat is the question\n")
    with pytest.raises(ValueError, match="--do_eval.*validation split.*--validation_split_percentage"):
        _run_main("run_mlm", monkeypatch, "--do_train", "--do_eval", "--use_cpu", "--output_dir",
                  str(tmp_path / "out"), "--train_file", str(train), "--validation_split_percentage", "0")


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, monkeypatch):
    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "model")
    gpt2_bpe_tokenizer().save_pretrained(tmp_path / "gpt2-tokenizer")
    refused = "tokenizer has 50257 tokens but the model embeds only 1000.*--tokenizer_name"
    with pytest.raises(ValueError, match=refused):
        _run_main("run_clm", monkeypatch, "--do_train", "--use_cpu", "--output_dir", str(tmp_path / "out"),
                  "--model_name_or_path", str(tmp_path / "model"),
                  "--tokenizer_name", str(tmp_path / "gpt2-tokenizer"))


def test_mlm_needs_a_mask_token(tmp_path, monkeypatch):
    gpt2_bpe_tokenizer().save_pretrained(tmp_path / "gpt2-tokenizer")
    with pytest.raises(ValueError, match="no mask token.*run_clm.py"):
        _run_main("run_mlm", monkeypatch, "--do_train", "--use_cpu", "--output_dir", str(tmp_path / "out"),
                  "--config_name", str(minilm_path()), "--tokenizer_name", str(tmp_path / "gpt2-tokenizer"))


def test_models_from_a_pretrained_config_do_not_claim_pretrained_weights(tmp_path):
    """`--config_name <pre-trained path>` trains from scratch: the model keeps no path, so groups start from different
    random weights (`codistill_shared_init` unset) and the model card names no base model."""
    from transformers import AutoTokenizer, ViTConfig

    from hf_codistill.recipes.arguments import ModelArguments
    from hf_codistill.recipes.images import build_image_classifier
    from hf_codistill.recipes.text import build_language_model

    ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32).save_pretrained(tmp_path / "vit")
    vit = build_image_classifier(ModelArguments(config_name=str(tmp_path / "vit")), ["a", "b"], 8, 1)
    bert = build_language_model(ModelArguments(config_name=str(minilm_path()), config_overrides="num_hidden_layers=1"),
                                AutoModelForMaskedLM, AutoTokenizer.from_pretrained(minilm_path()))
    assert vit.name_or_path == "" and bert.name_or_path == ""


@pytest.mark.skipif(not fashion_mnist_available(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_vit(tmp_path):
    """Debian's Fashion-MNIST (70k 28x28 images, read from its IDX files) through the ViT recipe."""
    out = tmp_path / "fashion"
    proc = subprocess.run([sys.executable, str(RECIPES / "run_image_classification.py"), *COMMON,
                           *ARGS["run_image_classification.py"], "--use_cpu", "--dataset_name", "fashion_mnist",
                           "--output_dir", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Training data: fashion_mnist (built in, offline)" in proc.stdout + proc.stderr
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.image_size == 28 and model.config.id2label[9] == "Ankle boot"
    assert json.loads((out / "eval_results.json").read_text())["eval_samples"] == 32


def test_the_plain_baseline_resumes_from_its_last_complete_checkpoint(tmp_path):
    """Without `--codistill` a recipe resumes like Trainer, from the newest checkpoint, but not from one cut short
    (Trainer writes `trainer_state.json` last)."""
    from hf_codistill import CodistillTrainingArguments
    from hf_codistill.recipes.workflow import find_resume_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "model.safetensors").write_bytes(b"")
        if complete:
            (checkpoint / "trainer_state.json").write_text("{}")
    args = CodistillTrainingArguments(output_dir=str(tmp_path), do_train=True, report_to="none", use_cpu=True)
    assert find_resume_checkpoint(args) == str(tmp_path / "checkpoint-4")


def test_causal_lm_blocks_keep_end_of_text_as_a_target():
    """GPT-2 pads with its end-of-text token, which `DataCollatorForLanguageModeling` then ignores wherever it is:
    blocks of concatenated text need no padding, so there it stays a target (documents separated by it)."""
    from hf_codistill.recipes.text import causal_lm_collator

    tokenizer = gpt2_bpe_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    ids = tokenizer("Once upon a time.<|endoftext|>The end.")["input_ids"]
    assert tokenizer.eos_token_id in ids
    block = {"input_ids": ids, "attention_mask": [1] * len(ids), "special_tokens_mask": [0] * len(ids)}
    batch = causal_lm_collator(tokenizer, line_by_line=False)([block, block])
    assert batch["labels"].tolist() == [ids, ids] and "special_tokens_mask" not in batch
    padded = causal_lm_collator(tokenizer, line_by_line=True)([block])
    assert -100 in padded["labels"].tolist()[0]  # the lines' collator: end-of-text is padding there


def test_shakespeare_speeches_go_on_after_a_stage_direction():
    """Theseus's first speech in A Midsummer Night's Dream continues after `_Exit PHILOSTRATE_`: the verse that
    follows names no speaker but is still his (6.6% of the verse was dropped when such blocks were skipped)."""
    from hf_codistill.recipes.data import load_shakespeare

    plays = load_shakespeare()
    train = plays["train"]
    dream = [(speaker, text) for speaker, text, play in zip(train["speaker"], train["text"], train["play"])
             if play == "a-midsummer-night-s-dream"]
    speaker, speech = next((speaker, text) for speaker, text in dream if text.startswith("Go, Philostrate,"))
    assert speaker == "THESEUS"
    assert speech.endswith("Hippolyta, I woo'd thee with my sword,\nAnd won thy love, doing thee injuries;\n"
                           "But I will wed thee in another key,\nWith pomp, with triumph and with revelling.")
    assert all("_" not in text and not text.startswith("#") for _, text in dream)
    # Not theirs: what follows a bare `_Exeunt_` (an epilogue), titles, and Edward III's `*Sound a horn.*` directions.
    lancaster = [text for speaker, text, play in zip(train["speaker"], train["text"], train["play"])
                 if play == "henry-iv-part-2" and speaker == "LANCASTER"]
    assert lancaster[-1].endswith("Come, will you hence?")
    lines = [line for text in train["text"] for line in text.splitlines()]
    assert not [line for line in lines if line.startswith(("*", "EPILOGUE", "SCENE "))]
    # Titles above the verse in the block itself: `EPILOGUE` / `SPOKEN BY PROSPERO` (The Tempest, validation).
    tempest = plays["validation"].filter(lambda row: row["play"] == "the-tempest")
    assert tempest[-1]["speaker"] == "PROSPERO" and tempest[-1]["text"].startswith("Now my charms are all o'erthrown")


# ---- run_classification.py: all-MiniLM-L6-v2 with a fresh head on the BBC News articles -----------------------------

CLASSIFY = RECIPES / "run_classification.py"
BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]
CLASSIFY_ARGS = ["--do_train", "--do_eval", "--do_predict", "--report_to", "none", "--max_seq_length", "32",
                 "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--save_strategy", "no"]


def _check_classifier_folder(folder):
    """A group's folder after `--do_train --do_eval --do_predict` on the BBC News default; returns its predictions."""
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert list(model.config.id2label.values()) == BBC_TOPICS and model.config.label2id["tech"] == 4
    results, scored = (json.loads((folder / f"{split}_results.json").read_text()) for split in ("eval", "predict"))
    assert all(0 <= results[f"eval_{key}"] <= 1 for key in ("accuracy", "f1", "ensemble_f1", "agreement_mean"))
    assert all(0 <= scored[f"predict_{key}"] <= 1 for key in ("accuracy", "f1")) and scored["predict_samples"] == 12
    header, *rows = [line.split("\t") for line in (folder / "predict_results.txt").read_text().splitlines()]
    assert header == ["index", "prediction"] and [int(index) for index, _ in rows] == list(range(12))
    card = (folder / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card and "| data | bbc_news (built in" in card
    return [label for _, label in rows]


@pytest.mark.parametrize("launched", [True, False], ids=["launched", "one_process"])
def test_classification_codistilled(launched, tmp_path):
    """2 groups x 2 gloo processes (each group's first process writes its group's predictions), or no launcher (both
    models in the process): every group's folder has its model, its scores and its own model's predictions."""
    out = tmp_path / "out"
    args = [*CLASSIFY_ARGS, "--max_steps", "4", "--max_train_samples", "32", "--max_eval_samples", "16",
            "--max_predict_samples", "12", "--codistill", "--codistill_sync_every", "2", "--output_dir", str(out)]
    if launched:
        output = launch(CLASSIFY, 4, args, None)
    else:
        proc = subprocess.run([sys.executable, str(CLASSIFY), *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "One process: training all 2 codistilled models in it." in (output := proc.stdout + proc.stderr)
    assert "Training data: bbc_news (built in, offline)" in output and not (out / "predict_results.txt").exists()
    predicted = [_check_classifier_folder(out / f"group_{g}") for g in (0, 1)]
    for split, key in (("eval", "eval_f1"), ("predict", "predict_accuracy")):  # each model's own, in its folder
        results = [json.loads((out / f"group_{g}" / f"{split}_results.json").read_text()) for g in (0, 1)]
        assert launched or results[1][key] == results[0][f"group_1/{key}"]
    texts = load_bbc_news()["test"][:12]["text"]  # re-predicted with each saved model: each file has its model's
    enc = AutoTokenizer.from_pretrained(out)(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    for group in (0, 1):
        with torch.no_grad():
            ids = AutoModelForSequenceClassification.from_pretrained(out / f"group_{group}")(**enc).logits.argmax(-1)
        assert predicted[group] == [BBC_TOPICS[i] for i in ids.tolist()]


def _write_csv(path, header, rows):
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def test_classification_from_files_plain_trainer(tmp_path):
    """CSV files, string labels, two text columns, a test file without labels: plain `Trainer`, predictions in
    `output_dir`, no scores for the unlabelled test examples."""
    rows = ["Rates,The bank raised rates,business", "Cup,We won the cup,sport", "Phone,A new phone,tech"] * 4
    files = [_write_csv(tmp_path / f"{split}.csv", "title,body,topic", rows) for split in ("train", "validation")]
    test = _write_csv(tmp_path / "test.csv", "title,body", ["Goal,A late goal won it", "Chips,A faster chip"])
    proc = subprocess.run([sys.executable, str(CLASSIFY), *CLASSIFY_ARGS, "--max_steps", "2", "--use_cpu",
                           "--train_file", files[0], "--validation_file", files[1], "--test_file", test,
                           "--text_column_names", "title,body", "--label_column_name", "topic", "--output_dir",
                           str(out := tmp_path / "plain")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "3 classes: business, sport, tech; text: title + body" in proc.stdout + proc.stderr
    assert json.loads((out / "eval_results.json").read_text())["eval_f1"] >= 0
    lines = (out / "predict_results.txt").read_text().splitlines()
    assert len(lines) == 3 and all(line.split("\t")[1] in ("business", "sport", "tech") for line in lines[1:])
    assert not (out / "predict_results.json").exists() and not (out / "group_0").exists()


def _load_classification(do_eval=False, do_predict=False, **arguments):
    from hf_codistill.recipes.arguments import ClassificationDataArguments
    from hf_codistill.recipes.classification import load_classification_data

    return load_classification_data(ClassificationDataArguments(**arguments), do_eval=do_eval, do_predict=do_predict)


def test_classification_data_and_its_errors(tmp_path, monkeypatch):
    data = _load_classification(dataset_name="bbc_news", do_eval=True, do_predict=True)  # the built-in default
    assert data.labels == BBC_TOPICS and data.text_columns == ["text"] and len(data.labelled) == 3
    assert {split: len(rows) for split, rows in data.raw.items()} == {"train": 1779, "validation": 223, "test": 223}
    assert [list(data.raw["test"]["label"]).count(label) for label in range(5)] == [51, 39, 42, 51, 40]
    assert list(data.raw["test"]["text"]) == list(load_bbc_news()["test"]["text"])  # the same split every time
    assert len(set(data.raw["train"]["label"][:10])) > 1  # shuffled: a prefix mixes the topics
    header = "title,body,topic"
    train = _write_csv(tmp_path / "train.csv", header, ["Rates rise,Rates rose,business", "Cup final,We won,sport"])
    music = _write_csv(tmp_path / "validation.csv", header, ["Gig,The band played,music"])
    (tmp_path / "empty.csv").write_text("")
    columns, topic = r"\(columns: title, body, topic\)", {"train_file": train, "label_column_name": "topic"}
    data = _load_classification(**topic, text_column_names="title, body")
    assert data.labels == ["business", "sport"] and data.text_columns == ["title", "body"]
    for arguments, refusal in [
        ({"train_file": train, "text_column_names": "title"},
         rf"Column 'label' is not in `--train_file` '.*train.csv' {columns}.*--label_column_name"),
        ({**topic, "text_column_names": "headline,body"}, rf"Column 'headline' is not in .*{columns}.*--text_column"),
        (topic, rf"no `text` or `sentence` column {columns}.*--text_column_names"),
        ({**topic, "validation_file": music, "text_column_names": "title", "do_eval": True},
         r"Label 'music' in `--validation_file` '.*validation.csv' is not among the labels of the training data "
         r"\('business', 'sport'\)"),
        ({**topic, "test_file": str(tmp_path / "empty.csv"), "text_column_names": "title", "do_predict": True},
         "`--test_file` '.*empty.csv' is empty"),
        ({**topic, "validation_file": _write_csv(tmp_path / "header.csv", header, []), "text_column_names": "title",
          "do_eval": True}, "`--validation_file` '.*header.csv' has no examples"),
        ({"train_file": "train.txt"}, r"`--train_file` 'train.txt' must be a .csv, .json or .jsonl file"),
        ({**topic, "text_column_names": "title", "do_predict": True}, "`--do_predict` needs test examples: give"),
        ({**topic, "train_file": _write_csv(tmp_path / "unlabelled.csv", header, ["Rates,Up,"]),
          "text_column_names": "title"}, "1 example of `--train_file` '.*unlabelled.csv' has no label in column"),
    ]:
        with pytest.raises(ValueError, match=refusal):
            _load_classification(**arguments)
    monkeypatch.setattr("hf_codistill.recipes.data.load_dataset", lambda *args, **kwargs: 1 / 0)  # no network
    with pytest.raises(ValueError, match="Could not load the data set 'bbc_new'.*Built in and offline: bbc_news"):
        _load_classification(dataset_name="bbc_new")


def test_shipped_f1_matches_scikit_learn():
    import evaluate
    import numpy as np
    from sklearn.metrics import f1_score

    f1, rng = evaluate.load(metric_path("f1")), np.random.default_rng(0)
    predictions, references, weights = rng.integers(0, 5, 40), rng.integers(0, 4, 40), rng.random(40)
    for average in ("micro", "macro", "weighted"):
        ours = f1.compute(predictions=predictions, references=references, average=average, sample_weight=weights)
        assert ours["f1"] == pytest.approx(f1_score(references, predictions, average=average, sample_weight=weights))
    with pytest.raises(ValueError, match="average='macro'"):  # Hub's default, "binary", on five classes
        f1.compute(predictions=predictions, references=references)
