"""Labelled text for the classification recipe: load it, check its columns and labels, tokenise it, build the
model, write its predictions."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Value, load_dataset
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from ..checkpointing import group_dir
from ..one_process import OneProcessCodistillTrainer
from .arguments import ClassificationDataArguments, ModelArguments
from .data import BUILTIN_CLASSIFICATION_DATASETS, load_raw_datasets
from .text import check_tokenizer_fits_model

logger = logging.getLogger(__name__)

SPLITS = {"train": "training", "validation": "validation", "test": "test"}
FILE_FLAGS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}
PREDICTIONS_FILE = "predict_results.txt"


@dataclass
class ClassificationData:
    """The raw splits a run needs (`train`, and `validation` / `test` for `--do_eval` / `--do_predict`), checked."""

    raw: DatasetDict
    labels: list[str]  # the class names, in id order
    text_columns: list[str]
    label_column: str
    description: str  # where the data came from (logs, model cards)
    labelled: set[str] = field(default_factory=set)  # the splits whose examples all carry a label


def load_classification_data(data_args: ClassificationDataArguments, model_args: ModelArguments | None = None, *,
                             do_eval: bool = False, do_predict: bool = False) -> ClassificationData:
    """The splits and their labels: from `--train_file` / `--validation_file` / `--test_file`, else the built-in set
    or Hub data set `--dataset_name` (default: `bbc_news`).

    Refuses, naming the file or split and the fix: a missing or empty file, a missing split, a text or label column
    that is not there, examples of the training data without a label, fewer than two classes, and a validation or
    test label that the training data does not have (the model would have no output for it). Test examples may come
    without labels: they are then predicted, not scored.
    """
    cache_dir, token = (model_args.cache_dir, model_args.token) if model_args is not None else (None, None)
    files = {split: getattr(data_args, flag) for split, flag in FILE_FLAGS.items()
             if getattr(data_args, flag) is not None}
    if files:
        if "train" not in files:
            raise ValueError("Give `--train_file` with the other files: the model's classes are read from the "
                             "training data's labels.")
        raw = DatasetDict({split: _read_file(path, FILE_FLAGS[split], cache_dir) for split, path in files.items()})
        description = ", ".join(files.values())
        sources = {split: f"`--{FILE_FLAGS[split]}` {path!r}" for split, path in files.items()}
        logger.info(f"Training data: {description}")
    else:
        raw, description = load_raw_datasets(
            data_args.dataset_name, data_args.dataset_config_name, builtin=BUILTIN_CLASSIFICATION_DATASETS,
            default="bbc_news", local_hint="local files with `--train_file`", cache_dir=cache_dir, token=token)
        sources = {split: f"the {split} split of {description}" for split in raw}
    needed = ["train"] + ["validation"] * do_eval + ["test"] * do_predict
    for split in needed:
        if split not in raw:
            fix = f"give `--{FILE_FLAGS[split]}`" if files else f"the data has the splits {', '.join(raw)}"
            need = {"train": "The model's classes are read from the training examples, and there are none",
                    "validation": "`--do_eval` needs validation examples",
                    "test": "`--do_predict` needs test examples"}[split]
            raise ValueError(f"{need}: {fix}.")
    raw = DatasetDict({split: raw[split] for split in needed})

    text_columns = data_args.text_columns or [_default_text_column(raw["train"], sources["train"])]
    label_column = data_args.label_column_name
    for split in needed:
        columns = raw[split].column_names
        for column in text_columns:
            if column not in columns:
                raise ValueError(f"Column {column!r} is not in {sources[split]} (columns: {', '.join(columns)}); set "
                                 "`--text_column_names` to the column(s) holding the text, comma-separated.")
        if label_column not in columns and split != "test":
            raise ValueError(f"Column {label_column!r} is not in {sources[split]} (columns: {', '.join(columns)}); "
                             "set `--label_column_name` to the column holding the labels.")
    labels = _class_names(raw["train"], label_column, sources["train"])
    labelled = {"train"}
    for split in needed[1:]:
        if label_column not in raw[split].column_names:
            logger.info(f"{sources[split]} has no {label_column!r} column: its examples are predicted, not scored.")
            continue
        keys = _label_keys(raw[split].features[label_column], raw[split].unique(label_column))
        if None in keys:
            if split == "validation":
                raise ValueError(f"Some examples of {sources[split]} have no label in column {label_column!r}: "
                                 "evaluation scores every example; label them or drop them.")
            logger.warning(f"Some examples of {sources[split]} have no label: predicting them all, scoring none.")
            continue
        unknown = sorted(set(keys) - set(labels))
        if unknown:
            raise ValueError(
                f"Label{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} in {sources[split]} "
                f"{'are' if len(unknown) > 1 else 'is'} not among the labels of the training data "
                f"({', '.join(map(repr, labels))}), so the model has no class for "
                f"{'them' if len(unknown) > 1 else 'it'}: add training examples with "
                f"{'these labels' if len(unknown) > 1 else 'this label'}, or correct or drop those examples."
            )
        labelled.add(split)
    logger.info(f"{len(labels)} classes: {', '.join(labels)}; text: {' + '.join(text_columns)}")
    return ClassificationData(raw, labels, text_columns, label_column, description, labelled)


def _read_file(path: str, flag: str, cache_dir: str | None) -> Dataset:
    if not os.path.isfile(path):
        raise ValueError(f"`--{flag}` {path!r} does not exist.")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip() and len(head) < 1 << 16:
        raise ValueError(f"`--{flag}` {path!r} is empty: give a file with one example per row (CSV: a header row "
                         "naming the columns first).")
    extension = path.rsplit(".", 1)[-1].lower()
    no_examples = ValueError(f"`--{flag}` {path!r} has no examples: give one example per row.")
    if extension == "csv" and len(head) < 1 << 16 and len([line for line in head.splitlines() if line.strip()]) < 2:
        raise no_examples  # a header row alone
    try:
        dataset = load_dataset("csv" if extension == "csv" else "json", data_files=path, cache_dir=cache_dir)["train"]
    except Exception as error:
        if "corresponds to no data" in str(error):  # what `datasets` says of a file without rows (`[]`)
            raise no_examples from error
        raise ValueError(f"Could not read `--{flag}` {path!r} as {'CSV' if extension == 'csv' else 'JSON'} "
                         f"({type(error).__name__}: {error}).") from error
    if len(dataset) == 0:
        raise no_examples
    return dataset


def _default_text_column(train: Dataset, source: str) -> str:
    for column in ("text", "sentence"):
        if column in train.column_names:
            return column
    raise ValueError(f"{source} has no `text` or `sentence` column (columns: {', '.join(train.column_names)}); "
                     "set `--text_column_names` to the column(s) holding the text, comma-separated.")


def _label_keys(feature, values: list) -> list[str | None]:
    """Labels as class names: a `ClassLabel`'s names (-1: none), numbers without a trailing `.0`, else `str`."""
    if isinstance(feature, ClassLabel):
        return [None if value is None or value < 0 else feature.names[value] for value in values]
    return [None if value is None else
            str(int(value)) if isinstance(value, float) and value.is_integer() else str(value) for value in values]


def _class_names(train: Dataset, column: str, source: str) -> list[str]:
    feature = train.features[column]
    if not isinstance(feature, (ClassLabel, Value)):
        raise ValueError(f"Column {column!r} of {source} holds {type(feature).__name__} values, not one label per "
                         "example: this recipe classifies each text into one class; set `--label_column_name` to a "
                         "column of single labels.")
    values = train.unique(column)
    if getattr(feature, "dtype", None) in ("float16", "float32", "float64") and not all(
            value is None or float(value).is_integer() for value in values):
        raise ValueError(f"Column {column!r} of {source} holds fractional numbers: this recipe classifies; set "
                         "`--label_column_name` to a column of class labels.")
    keys = _label_keys(feature, values)
    if None in keys:
        count = sum(key is None for key in _label_keys(feature, train[column]))
        raise ValueError(f"{count} example{'s' * (count > 1)} of {source} {'have' if count > 1 else 'has'} no label "
                         f"in column {column!r}: label them or drop them.")
    if isinstance(feature, ClassLabel):
        names = list(feature.names)  # the data set's own order, unused classes kept
    else:
        names = [key for _, key in sorted(zip(values, keys))]  # numbers in numeric order
    if len(names) < 2:
        raise ValueError(f"Classification needs at least two classes, but {source} has only "
                         f"{', '.join(map(repr, names))} in column {column!r}.")
    return names


def tokenize_examples(data: ClassificationData, split: str, dataset: Dataset | None,
                      tokenizer: PreTrainedTokenizerBase, data_args: ClassificationDataArguments,
                      training_args) -> Dataset | None:
    """`dataset` (of `split`) as `input_ids`, `attention_mask`, … truncated to `--max_seq_length`, and `labels`
    (class ids) when the split is labelled; the text columns are joined with a space."""
    if dataset is None:
        return None
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    if max_seq_length < data_args.max_seq_length:
        logger.warning(f"`--max_seq_length` {data_args.max_seq_length} exceeds the tokenizer's maximum; using "
                       f"{max_seq_length}.")
    # What `tokenize` reads, and `datasets` hashes to cache its result: small things only.
    text_columns, label_column = data.text_columns, data.label_column
    feature = dataset.features[label_column] if split in data.labelled else None
    class_ids = {name: i for i, name in enumerate(data.labels)}

    def tokenize(batch):
        texts = [" ".join("" if part is None else str(part) for part in parts)
                 for parts in zip(*(batch[column] for column in text_columns))]
        encoded = tokenizer(texts, truncation=True, max_length=max_seq_length)
        if feature is not None:
            encoded["labels"] = [class_ids[key] for key in _label_keys(feature, batch[label_column])]
        return encoded

    with training_args.main_process_first(desc=f"tokenising the {SPLITS[split]} examples"):
        return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names,
                           num_proc=data_args.preprocessing_num_workers,
                           load_from_cache_file=not data_args.overwrite_cache,
                           desc=f"Tokenising the {SPLITS[split]} examples")


def build_text_classifier(model_args: ModelArguments, labels: list[str],
                          tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """A pre-trained model with a fresh head for `labels` (`num_labels`, `id2label`, `label2id`), or one trained
    from scratch from `--config_name` [+ `--config_overrides`]."""
    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in id2label.items()}
    settings = {"num_labels": len(labels), "id2label": id2label, "label2id": label2id,
                "problem_type": "single_label_classification"}
    if model_args.model_name_or_path is not None:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
            token=model_args.token, trust_remote_code=model_args.trust_remote_code,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **settings,
        )
    elif model_args.config_name is not None:
        config = AutoConfig.from_pretrained(model_args.config_name, cache_dir=model_args.cache_dir,
                                            token=model_args.token, trust_remote_code=model_args.trust_remote_code)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        config.update(settings)
        if tokenizer is not None:
            config.vocab_size = len(tokenizer)
        config._name_or_path = ""  # from scratch: no base model on the card, separate initialisations per group
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
    else:
        raise ValueError("Give `--model_name_or_path` (a pre-trained model) or `--config_name` (to train from "
                         "scratch).")
    if tokenizer is not None:
        check_tokenizer_fits_model(tokenizer, model)
    return model


def write_predictions(trainer, predictions, labels: list[str]) -> list[str]:
    """`predict_results.txt` (`index<TAB>prediction`, a class name per test example) in each model's folder.

    In the one-process mode `predictions` holds one array per model and every model's folder (`group_<g>`) gets its
    own; launched, the first process of each group writes its group's; without codistillation, `output_dir`'s.
    Returns the files written by this process.
    """
    if isinstance(trainer, OneProcessCodistillTrainer):
        folders = [group_dir(trainer.codistill_root, group) for group in range(trainer.num_groups)]
    else:
        folders, predictions = [trainer.args.output_dir], [predictions]
    if not trainer.is_world_process_zero():
        return []
    written = []
    for folder, logits in zip(folders, predictions):
        logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits)
        ids = np.argmax(logits, axis=-1) if logits.ndim > 1 else logits  # logits, or class ids already
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, PREDICTIONS_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write("index\tprediction\n")
            f.writelines(f"{index}\t{labels[item]}\n" for index, item in enumerate(ids))
        written.append(path)
    logger.info(f"Predictions written to {', '.join(written)}")
    return written
