"""Support code for the example recipes in `recipes/` (`run_mlm.py`, `run_clm.py`, `run_image_classification.py`,
`run_classification.py`).

Not needed to use `CodistillTrainer`: this is what the recipes share, in the style of transformers' examples.

- `arguments`: the argument dataclasses parsed beside `CodistillTrainingArguments`;
- `workflow`: the steps every recipe takes the same way (parse and log, build models, pick splits, metrics,
  resume, train and evaluate, publish);
- `text` / `images`: loading, tokenising / transforming the data and building the models of the LM / ViT recipes;
- `classification`: the text classification recipe's labelled data (columns and labels checked), model and
  predictions;
- `data`: where data comes from (files, the Hub, or the built-in offline data sets and tokenizers).

The core of `hf_codistill` never imports this subpackage.
"""

from .arguments import (
    ClassificationDataArguments,
    ImageDataArguments,
    LoraArguments,
    ModelArguments,
    TextDataArguments,
)
from .workflow import (
    build_models,
    classification_metrics,
    default_to_minilm,
    publish,
    select_splits,
    start_recipe,
    token_metrics,
    train_and_evaluate,
)

__all__ = [
    "ClassificationDataArguments",
    "ImageDataArguments",
    "LoraArguments",
    "ModelArguments",
    "TextDataArguments",
    "build_models",
    "default_to_minilm",
    "classification_metrics",
    "publish",
    "select_splits",
    "start_recipe",
    "token_metrics",
    "train_and_evaluate",
]
