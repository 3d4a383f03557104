"""The argument dataclasses the recipes share, parsed with `HfArgumentParser` beside `CodistillTrainingArguments`."""

from __future__ import annotations

from dataclasses import dataclass, field


def _check_sample_limits(data_args) -> None:
    for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
        value = getattr(data_args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` is {value}; give a positive number of examples, or leave it unset for all.")


@dataclass
class ModelArguments:
    """Which model, config and tokenizer / image processor to start from."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local folder of a pre-trained model. Leave unset to train from scratch."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config (Hub id or path) to train from scratch, if not the model's."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Override config values when training from scratch, e.g. `n_embd=128,n_layer=4`."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (Hub id or path), if not the model's."}
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor (Hub id or path)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store downloaded models and data."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model on the Hub."})
    token: str | None = field(
        default=None, metadata={"help": "Hub token for private models; defaults to the one `hf auth login` stored."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models whose code lives on the Hub (runs that code locally)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Allow an output head of another size than the checkpoint's."}
    )

    def __post_init__(self):
        if self.config_overrides is not None and self.model_name_or_path is not None:
            raise ValueError(
                "`--config_overrides` only applies when training from scratch: drop it or `--model_name_or_path`."
            )


@dataclass
class LoraArguments:
    """Train LoRA adapters of the model instead of the model (TRL's flag names); codistilled groups then hold their
    peers as adapters on their own base model and exchange the adapters only."""

    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (needs `pip install peft`)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (the update is alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules to adapt, e.g. `c_attn` (GPT-2) or `query value` (BERT); unset: peft's default "
                          "for the architecture.", "nargs": "+"},
    )

    def peft_config(self, task_type: str | None = None):
        """The `peft.LoraConfig` these flags describe, or None without `--use_peft`."""
        if not self.use_peft:
            return None
        try:
            from peft import LoraConfig
        except ImportError as error:
            raise ImportError("`--use_peft` needs the `peft` package: `pip install peft`.") from error
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.lora_target_modules, task_type=task_type)


@dataclass
class TextDataArguments:
    """Which text to train on and how to cut it into examples."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub data set, or `shakespeare` (built in, offline). With no data argument: shakespeare."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub data set."})
    train_file: str | None = field(default=None, metadata={"help": "Training text: a .txt, .csv or .json(l) file."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation text, same formats."})
    text_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the text; defaults to `text`, else the first column."}
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of the training data held out when there is no validation split."}
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per example; defaults to the tokenizer's maximum, capped at 1024."},
    )
    line_by_line: bool = field(
        default=False,
        metadata={"help": "One example per line (row) of the data, padded; by default texts are concatenated and "
                  "cut into blocks of `max_seq_length`."},
    )
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "With `--line_by_line`, pad every example to `max_seq_length`."}
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "Masked LM: fraction of tokens to mask."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the cached tokenised data."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set (debugging)."})

    def __post_init__(self):
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"`--validation_split_percentage` is {self.validation_split_percentage}; give a percent in [0, 100)."
            )
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"`--mlm_probability` is {self.mlm_probability}; give a fraction in (0, 1).")
        if self.max_seq_length is not None and self.max_seq_length < 1:
            raise ValueError(
                f"`--max_seq_length` is {self.max_seq_length}; give a positive number of tokens, or leave it unset "
                "for the tokenizer's maximum (capped at 1024)."
            )
        _check_sample_limits(self)
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and path.rsplit(".", 1)[-1] not in ("txt", "csv", "json", "jsonl"):
                raise ValueError(f"`--{name}` {path!r} must be a .txt, .csv, .json or .jsonl file.")


@dataclass
class ImageDataArguments:
    """Which images to train on and how to augment them."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub data set, or a built-in offline one: `digits` (scikit-learn) or `fashion_mnist`."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub data set."})
    train_dir: str | None = field(default=None, metadata={"help": "An imagefolder of training images."})
    validation_dir: str | None = field(default=None, metadata={"help": "An imagefolder of validation images."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of the training set held out when there is no validation split."}
    )
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels."})
    image_size: int | None = field(
        default=None, metadata={"help": "Side of the (square) model input; defaults to the model's or the data's."}
    )
    random_crop_padding: int = field(
        default=0, metadata={"help": "Augmentation: pad by this many pixels and crop back at a random offset."}
    )
    random_flip: bool = field(default=False, metadata={"help": "Augmentation: random horizontal flips."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set (debugging)."})

    def __post_init__(self):
        _check_sample_limits(self)


CLASSIFICATION_FILE_TYPES = ("csv", "json", "jsonl")


@dataclass
class ClassificationDataArguments:
    """Which labelled text to train on, which columns hold the text and the label, and how much of it."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub data set, or `bbc_news` (built in, offline). With no data argument: bbc_news."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub data set."})
    train_file: str | None = field(default=None, metadata={"help": "Training examples: a .csv or .json(l) file."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation examples, same formats."})
    test_file: str | None = field(
        default=None, metadata={"help": "Examples to predict (`--do_predict`), same formats; labels optional."}
    )
    text_column_names: str | None = field(
        default=None,
        metadata={"help": "Column(s) holding the text, comma-separated (joined with a space); defaults to `text`, "
                  "else `sentence`."},
    )
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels."})
    max_seq_length: int = field(
        default=128, metadata={"help": "Tokens per example: longer texts are truncated (capped at the tokenizer's)."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the cached tokenised data."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set (debugging)."})
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Truncate the test set that `--do_predict` predicts (debugging)."}
    )

    def __post_init__(self):
        if self.max_seq_length < 1:
            raise ValueError(f"`--max_seq_length` is {self.max_seq_length}; give a positive number of tokens.")
        _check_sample_limits(self)
        for name in ("train_file", "validation_file", "test_file"):
            path = getattr(self, name)
            if path is not None and path.rsplit(".", 1)[-1].lower() not in CLASSIFICATION_FILE_TYPES:
                raise ValueError(f"`--{name}` {path!r} must be a .csv, .json or .jsonl file (one example per row, "
                                 "with the text and label columns).")

    @property
    def text_columns(self) -> list[str] | None:
        """`--text_column_names` as a list (None when unset)."""
        if self.text_column_names is None:
            return None
        return [name.strip() for name in self.text_column_names.split(",") if name.strip()]
