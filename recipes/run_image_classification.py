#!/usr/bin/env python
"""Fine-tune or train from scratch a ViT for image classification, optionally with codistillation.

    # built-in default data (scikit-learn's digits), 2 groups x 2 processes on one CPU machine
    accelerate launch --config_file recipes/configs/cpu_4proc_2groups.yaml recipes/run_image_classification.py \
        --codistill --output_dir runs/vit-digits
    # without --codistill: a plain Trainer recipe, the all-reduce baseline

Data: `--dataset_name` (a Hub data set, or `digits` / `fashion_mnist`, which install offline), or `--train_dir`
(an imagefolder). With neither, scikit-learn's digits are used.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

import evaluate
import numpy as np
import torch
import torch.nn.functional as F
from datasets import load_dataset
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, ViTConfig, set_seed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hf_codistill import CodistillTrainer  # noqa: E402
from hf_codistill.data import BUILTIN_IMAGE_DATASETS  # noqa: E402
from hf_codistill.metrics import metric_path  # noqa: E402
from hf_codistill.recipe_utils import find_resume_checkpoint, parse_recipe_args, setup_logging  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of a pre-trained model; leave unset to train from scratch."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Config (Hub id or path) to train from scratch."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Override config values when training from scratch, e.g. `hidden_size=128,num_hidden_layers=6`."},
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor (Hub id or path)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store downloaded models and data."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Allow a classification head of another size than the checkpoint's."}
    )


@dataclass
class DataTrainingArguments:
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


def load_image_data(data_args, model_args):
    if data_args.train_dir is not None:
        files = {"train": os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir is not None:
            files["validation"] = os.path.join(data_args.validation_dir, "**")
        return load_dataset("imagefolder", data_files=files, cache_dir=model_args.cache_dir), "imagefolder"
    name = data_args.dataset_name or "digits"
    if name in BUILTIN_IMAGE_DATASETS:
        return BUILTIN_IMAGE_DATASETS[name](), f"{name} (built in, offline)"
    return load_dataset(name, data_args.dataset_config_name, cache_dir=model_args.cache_dir), name


def build_model(model_args, num_labels, labels, image_size, num_channels):
    id2label = {i: label for i, label in enumerate(labels)}
    label2id = {label: i for i, label in id2label.items()}
    if model_args.model_name_or_path:
        return AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=num_labels, id2label=id2label, label2id=label2id,
            cache_dir=model_args.cache_dir, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )
    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name, cache_dir=model_args.cache_dir)
    else:
        # A small ViT sized for the data: 4x4 patches, 4 layers of width 64.
        config = ViTConfig(image_size=image_size, patch_size=max(1, image_size // 4), num_channels=num_channels,
                           hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    config.num_labels, config.id2label, config.label2id = num_labels, id2label, label2id
    return AutoModelForImageClassification.from_config(config)


def main():
    model_args, data_args, training_args = parse_recipe_args(ModelArguments, DataTrainingArguments)
    setup_logging(training_args)

    raw, data_description = load_image_data(data_args, model_args)
    logger.warning(f"Training data: {data_description}")
    for column in (data_args.image_column_name, data_args.label_column_name):
        if column not in raw["train"].column_names:
            raise ValueError(
                f"Column {column!r} is not in the data set (columns: {', '.join(raw['train'].column_names)}); "
                "set `--image_column_name` / `--label_column_name`."
            )
    if "validation" not in raw and training_args.do_eval:
        if not 0 < data_args.train_val_split < 1:
            raise ValueError(
                f"The data has no validation split and `--train_val_split` is {data_args.train_val_split}; give a "
                "fraction in (0, 1), a `--validation_dir`, or drop `--do_eval`."
            )
        split = raw["train"].train_test_split(data_args.train_val_split, seed=training_args.seed)
        raw["train"], raw["validation"] = split["train"], split["test"]

    labels = raw["train"].features[data_args.label_column_name].names
    first_image = raw["train"][0][data_args.image_column_name]
    num_channels = 1 if first_image.mode in ("L", "1", "I", "F") else 3

    mean, std, image_size = [0.5] * num_channels, [0.5] * num_channels, data_args.image_size or first_image.size[0]
    if model_args.model_name_or_path or model_args.image_processor_name:
        processor = AutoImageProcessor.from_pretrained(
            model_args.image_processor_name or model_args.model_name_or_path, cache_dir=model_args.cache_dir
        )
        mean, std = list(processor.image_mean), list(processor.image_std)
        image_size = data_args.image_size or processor.size.get("height", processor.size.get("shortest_edge"))

    # Different groups start from different random weights (seed + group); a pre-trained model starts them equal.
    set_seed(training_args.group_seed)
    model = build_model(model_args, len(labels), labels, image_size, num_channels)
    num_channels = model.config.num_channels
    # One statistic per input channel (a grayscale model fine-tuned from RGB statistics takes the first).
    mean_t = torch.tensor((list(mean) * num_channels)[:num_channels]).view(-1, 1, 1)
    std_t = torch.tensor((list(std) * num_channels)[:num_channels]).view(-1, 1, 1)

    def to_tensor(image: Image.Image, train: bool) -> torch.Tensor:
        image = image.convert("L" if num_channels == 1 else "RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        pixels = pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)
        if train and data_args.random_crop_padding > 0:
            pad = data_args.random_crop_padding
            padded = F.pad(pixels, (pad, pad, pad, pad))
            top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            pixels = padded[:, top : top + image_size, left : left + image_size]
        if train and data_args.random_flip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return (pixels - mean_t) / std_t

    def transform(train: bool):
        def apply(batch):
            return {
                "pixel_values": [to_tensor(image, train) for image in batch[data_args.image_column_name]],
                "labels": batch[data_args.label_column_name],
            }

        return apply

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = raw["train"]
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
        train_dataset.set_transform(transform(train=True))
    if training_args.do_eval:
        eval_dataset = raw["validation"]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))
        eval_dataset.set_transform(transform(train=False))

    accuracy = evaluate.load(metric_path("accuracy"))

    def compute_metrics(prediction):
        return accuracy.compute(predictions=np.argmax(prediction.predictions, axis=-1),
                                references=prediction.label_ids)

    def collate(examples):
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([example["labels"] for example in examples]),
        }

    training_args.remove_unused_columns = False
    trainer = CodistillTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        data_collator=collate,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=find_resume_checkpoint(training_args))
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "image-classification",
            "dataset": data_description, "tags": ["image-classification", "vision"]}
    if training_args.codistill:
        card["tags"].append("codistillation")
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)


if __name__ == "__main__":
    main()
