"""Images for the ViT recipe: load them, build the model, turn images into normalised, augmented tensors."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from datasets import DatasetDict
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, ViTConfig

from .arguments import ImageDataArguments, ModelArguments
from .data import BUILTIN_IMAGE_DATASETS, load_raw_datasets


def load_image_data(data_args: ImageDataArguments, model_args: ModelArguments, seed: int,
                    needs_validation: bool) -> tuple[DatasetDict, str]:
    """`train`/`validation` splits and where they came from: an imagefolder, a built-in set, or the Hub."""
    files = {}
    if data_args.train_dir is not None:
        files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir is not None:
            files["validation"] = os.path.join(data_args.validation_dir, "**")
    raw, description = load_raw_datasets(
        data_args.dataset_name, data_args.dataset_config_name, builtin=BUILTIN_IMAGE_DATASETS, default="digits",
        local_hint="an imagefolder with `--train_dir`", cache_dir=model_args.cache_dir, token=model_args.token,
        builder="imagefolder", data_files=files, files_description="imagefolder",
    )
    for column in (data_args.image_column_name, data_args.label_column_name):
        if column not in raw["train"].column_names:
            raise ValueError(
                f"Column {column!r} is not in the data set (columns: {', '.join(raw['train'].column_names)}); "
                "set `--image_column_name` / `--label_column_name`."
            )
    if "validation" not in raw and needs_validation:
        if not 0 < data_args.train_val_split < 1:
            raise ValueError(
                f"The data has no validation split and `--train_val_split` is {data_args.train_val_split}; give a "
                "fraction in (0, 1), a `--validation_dir`, or drop `--do_eval`."
            )
        split = raw["train"].train_test_split(data_args.train_val_split, seed=seed)
        raw = DatasetDict({"train": split["train"], "validation": split["test"]})
    return raw, description


def build_image_classifier(model_args: ModelArguments, labels: list[str], image_size: int, num_channels: int):
    """A pre-trained model with a head for `labels`, or a small ViT sized for the data (4x4 patches, width 64)."""
    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in id2label.items()}
    if model_args.model_name_or_path:
        return AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=len(labels), id2label=id2label, label2id=label2id,
            cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )
    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name, cache_dir=model_args.cache_dir)
    else:
        config = ViTConfig(image_size=image_size, patch_size=max(1, image_size // 4), num_channels=num_channels,
                           hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    config.num_labels, config.id2label, config.label2id = len(labels), id2label, label2id
    # Trained from scratch: the model must not claim the config's origin as its weights' (the model card's
    # base model; `CodistillTrainer`'s default of one shared initialisation for pre-trained models).
    config._name_or_path = ""
    return AutoModelForImageClassification.from_config(config)


def normalisation(model_args: ModelArguments, num_channels: int, data_image_size: int,
                  requested_size: int | None) -> tuple[list[float], list[float], int]:
    """(mean, std, side) from the image processor of a pre-trained model, else 0.5 / 0.5 and the data's size."""
    mean, std, size = [0.5] * num_channels, [0.5] * num_channels, requested_size or data_image_size
    if model_args.model_name_or_path or model_args.image_processor_name:
        processor = AutoImageProcessor.from_pretrained(
            model_args.image_processor_name or model_args.model_name_or_path, cache_dir=model_args.cache_dir
        )
        mean, std = list(processor.image_mean), list(processor.image_std)
        size = requested_size or processor.size.get("height", processor.size.get("shortest_edge"))
    return mean, std, size


class ImageTransform:
    """PIL image -> normalised (C, H, W) tensor, with optional random-crop and flip augmentation for training."""

    def __init__(self, mean, std, image_size: int, num_channels: int, crop_padding: int = 0, flip: bool = False):
        # One statistic per input channel (a grayscale model fine-tuned from RGB statistics takes the first).
        self.mean = torch.tensor((list(mean) * num_channels)[:num_channels]).view(-1, 1, 1)
        self.std = torch.tensor((list(std) * num_channels)[:num_channels]).view(-1, 1, 1)
        self.image_size, self.num_channels = image_size, num_channels
        self.crop_padding, self.flip = crop_padding, flip

    def __call__(self, image: Image.Image, train: bool) -> torch.Tensor:
        image = image.convert("L" if self.num_channels == 1 else "RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        pixels = pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)
        if train and self.crop_padding > 0:
            pad = self.crop_padding
            padded = F.pad(pixels, (pad, pad, pad, pad))
            top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            pixels = padded[:, top : top + self.image_size, left : left + self.image_size]
        if train and self.flip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return (pixels - self.mean) / self.std

    def for_batches(self, image_column: str, label_column: str, train: bool):
        """A `set_transform` function producing `pixel_values` and `labels`."""

        def apply(batch):
            return {"pixel_values": [self(image, train) for image in batch[image_column]],
                    "labels": batch[label_column]}

        return apply


def collate_images(examples) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }
