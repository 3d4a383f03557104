"""Text for the language-model recipes: load it, pick the tokenizer and model, cut the text into examples."""

from __future__ import annotations

import logging
from itertools import chain

from datasets import DatasetDict
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    default_data_collator,
)

from ..compat import align_loss_accounting
from .arguments import ModelArguments, TextDataArguments
from .data import BUILTIN_TEXT_DATASETS, load_raw_datasets

logger = logging.getLogger(__name__)

MAX_DEFAULT_SEQ_LENGTH = 1024


def load_text_data(data_args: TextDataArguments, model_args: ModelArguments, seed: int,
                   needs_validation: bool = False) -> tuple[DatasetDict, str]:
    """The raw text as `train`/`validation` splits, and a description of where it came from (for logs and cards).

    Refuses data left without a validation split when `needs_validation` (`--do_eval`), and data without the text
    column (`text_column_of`).
    """
    files = {split: path for split, path in (("train", data_args.train_file),
                                             ("validation", data_args.validation_file)) if path is not None}
    extension = next(iter(files.values())).rsplit(".", 1)[-1] if files else None
    raw, description = load_raw_datasets(
        data_args.dataset_name, data_args.dataset_config_name, builtin=BUILTIN_TEXT_DATASETS, default="shakespeare",
        local_hint="local files with `--train_file`", cache_dir=model_args.cache_dir, token=model_args.token,
        builder={"txt": "text", "jsonl": "json"}.get(extension, extension), data_files=files,
        files_description=", ".join(files.values()),
    )
    if "train" not in raw:
        raise ValueError(f"The data has no `train` split (splits: {', '.join(raw)}); give `--train_file`.")
    if "validation" not in raw:
        raw = hold_out_validation(raw, data_args.validation_split_percentage, seed)
    if needs_validation and "validation" not in raw:
        raise ValueError("`--do_eval` needs a validation split: give `--validation_file` or a "
                         "`--validation_split_percentage` above 0.")
    text_column_of(raw, data_args)
    return raw, description


def hold_out_validation(raw: DatasetDict, percentage: int, seed: int) -> DatasetDict:
    """Split `percentage`% of the training rows off as validation (none if 0: evaluation then needs a split)."""
    if percentage == 0:
        return raw
    split = raw["train"].train_test_split(test_size=percentage / 100, seed=seed)
    return DatasetDict({"train": split["train"], "validation": split["test"]})


def text_column_of(raw: DatasetDict, data_args: TextDataArguments) -> str:
    """`--text_column_name` (which must be a column), else `text`, else the first column."""
    columns = raw["train"].column_names
    if data_args.text_column_name is not None:
        if data_args.text_column_name not in columns:
            raise ValueError(
                f"Column {data_args.text_column_name!r} is not in the data set (columns: {', '.join(columns)}); "
                "set `--text_column_name`."
            )
        return data_args.text_column_name
    return "text" if "text" in columns else columns[0]


def load_tokenizer(model_args: ModelArguments, default=None) -> PreTrainedTokenizerBase:
    """`--tokenizer_name`, else the model's tokenizer, else the recipe's default (a callable or a path)."""
    source = model_args.tokenizer_name or model_args.model_name_or_path
    if source is None:
        if default is None:
            raise ValueError("Training from scratch needs a tokenizer: give `--tokenizer_name`.")
        return default() if callable(default) else AutoTokenizer.from_pretrained(default)
    return AutoTokenizer.from_pretrained(
        source, cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )


def build_language_model(model_args: ModelArguments, auto_class, tokenizer: PreTrainedTokenizerBase,
                         default_config=None) -> PreTrainedModel:
    """A pre-trained model, or one from a config (`--config_name`, else `default_config`) sized to the tokenizer."""
    if model_args.model_name_or_path is not None:
        model = auto_class.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
            token=model_args.token, trust_remote_code=model_args.trust_remote_code,
        )
    else:
        if model_args.config_name is not None:
            config = AutoConfig.from_pretrained(model_args.config_name, cache_dir=model_args.cache_dir,
                                                token=model_args.token)
        elif default_config is not None:
            config = default_config
        else:
            raise ValueError("Training from scratch needs a config: give `--config_name` or `--model_name_or_path`.")
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        config.vocab_size = len(tokenizer)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name, None) is not None:
                setattr(config, name, getattr(tokenizer, name))
        # Trained from scratch: the model must not claim the config's origin as its weights' (the model card's
        # base model; `CodistillTrainer`'s default of one shared initialisation for pre-trained models).
        config._name_or_path = ""
        model = auto_class.from_config(config, trust_remote_code=model_args.trust_remote_code)
    check_tokenizer_fits_model(tokenizer, model)
    align_loss_accounting(model)
    return model


def check_tokenizer_fits_model(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Token ids beyond the embedding table crash mid-training (or index garbage on GPU); fail before that."""
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model embeds only {embeddings}: use the model's own "
            "tokenizer (drop `--tokenizer_name`) or a model trained with this tokenizer."
        )


def prepare_lm_datasets(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, data_args: TextDataArguments,
                        training_args) -> DatasetDict:
    """Tokenise the text column, then either keep one example per row (`--line_by_line`) or concatenate and cut
    into blocks."""
    text_column = text_column_of(raw, data_args)
    max_seq_length = min(data_args.max_seq_length or MAX_DEFAULT_SEQ_LENGTH, tokenizer.model_max_length)
    if data_args.max_seq_length is not None and max_seq_length < data_args.max_seq_length:
        logger.warning(f"`--max_seq_length` {data_args.max_seq_length} exceeds the tokenizer's maximum; using "
                       f"{max_seq_length}.")
    map_kwargs = {"batched": True, "num_proc": data_args.preprocessing_num_workers,
                  "load_from_cache_file": not data_args.overwrite_cache}
    with training_args.main_process_first(desc="tokenising the text"):
        if data_args.line_by_line:
            padding = "max_length" if data_args.pad_to_max_length else False

            def tokenize_lines(examples):
                lines = [line for line in examples[text_column] if line and not line.isspace()]
                return tokenizer(lines, padding=padding, truncation=True, max_length=max_seq_length,
                                 return_special_tokens_mask=True)

            return raw.map(tokenize_lines, remove_columns=raw["train"].column_names, desc="Tokenising", **map_kwargs)

        def tokenize(examples):
            return tokenizer(examples[text_column], return_special_tokens_mask=True)

        def group_texts(examples):
            concatenated = {key: list(chain(*examples[key])) for key in examples}
            length = (len(concatenated["input_ids"]) // max_seq_length) * max_seq_length
            return {key: [values[i : i + max_seq_length] for i in range(0, length, max_seq_length)]
                    for key, values in concatenated.items()}

        tokenized = raw.map(tokenize, remove_columns=raw["train"].column_names, desc="Tokenising", **map_kwargs)
        return tokenized.map(group_texts, desc=f"Grouping into blocks of {max_seq_length}", **map_kwargs)


def causal_lm_collator(tokenizer: PreTrainedTokenizerBase, line_by_line: bool):
    """Labels for causal LM training. Blocks of concatenated text have no padding: every token is a target, an
    end-of-text token too, which `DataCollatorForLanguageModeling` would ignore when it doubles as the padding token
    (GPT-2's). Lines need padding, and that collator."""
    if line_by_line:
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return _blocks_as_their_own_labels


def _blocks_as_their_own_labels(features: list[dict]) -> dict:
    features = [{key: value for key, value in feature.items() if key != "special_tokens_mask"} for feature in features]
    batch = default_data_collator(features)
    batch["labels"] = batch["input_ids"].clone()
    return batch
