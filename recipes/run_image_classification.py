#!/usr/bin/env python
"""Fine-tune or train from scratch a ViT for image classification, optionally with codistillation.

    # built-in default data (scikit-learn's digits), 2 groups x 2 processes on one CPU machine
    accelerate launch --config_file recipes/configs/cpu_4proc_2groups.yaml recipes/run_image_classification.py \
        --codistill --do_train --do_eval --output_dir runs/vit-digits
    # without --codistill: a plain Trainer recipe, the all-reduce baseline

Data: `--dataset_name` (a Hub data set, or `digits` / `fashion_mnist`, which install offline), or `--train_dir`
(an imagefolder). With neither, scikit-learn's digits are used.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hf_codistill import CodistillTrainer  # noqa: E402
from hf_codistill.image_pipeline import (  # noqa: E402
    ImageTransform,
    build_image_classifier,
    collate_images,
    load_image_data,
    normalisation,
)
from hf_codistill.recipe_args import ImageDataArguments, ModelArguments  # noqa: E402
from hf_codistill.recipe_utils import (  # noqa: E402
    build_models,
    classification_metrics,
    parse_recipe_args,
    publish,
    setup_logging,
    train_and_evaluate,
)
from hf_codistill.text_pipeline import truncate  # noqa: E402

logger = logging.getLogger("hf_codistill.recipes")


def main():
    model_args, data_args, training_args = parse_recipe_args(ModelArguments, ImageDataArguments)
    setup_logging(training_args)

    raw, data_description = load_image_data(data_args, model_args, training_args.seed, training_args.do_eval)
    logger.info(f"Training data: {data_description}")

    labels = raw["train"].features[data_args.label_column_name].names
    first_image = raw["train"][0][data_args.image_column_name]
    num_channels = 1 if first_image.mode in ("L", "1", "I", "F") else 3
    mean, std, image_size = normalisation(model_args, num_channels, first_image.size[0], data_args.image_size)

    model = build_models(training_args, lambda: build_image_classifier(model_args, labels, image_size, num_channels))
    config = (model[0] if isinstance(model, list) else model).config
    transform = ImageTransform(mean, std, image_size, config.num_channels,
                               crop_padding=data_args.random_crop_padding, flip=data_args.random_flip)
    columns = (data_args.image_column_name, data_args.label_column_name)

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = truncate(raw["train"], data_args.max_train_samples)
        train_dataset.set_transform(transform.for_batches(*columns, train=True))
    if training_args.do_eval:
        eval_dataset = truncate(raw["validation"], data_args.max_eval_samples)
        eval_dataset.set_transform(transform.for_batches(*columns, train=False))

    training_args.remove_unused_columns = False
    trainer = CodistillTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=classification_metrics(),
        data_collator=collate_images,
    )
    train_and_evaluate(trainer, training_args, len(train_dataset or []), len(eval_dataset or []))
    publish(trainer, training_args, finetuned_from=model_args.model_name_or_path, tasks="image-classification",
            dataset=data_description, tags=["image-classification", "vision"])


if __name__ == "__main__":
    main()
