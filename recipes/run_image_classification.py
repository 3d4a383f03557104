#!/usr/bin/env python
"""Fine-tune or train from scratch a ViT for image classification, optionally with codistillation.

    # built-in default data (scikit-learn's digits), 2 groups x 2 processes on one CPU machine
    accelerate launch --config_file recipes/configs/cpu_4proc_2groups.yaml recipes/run_image_classification.py \
        --codistill --do_train --do_eval --output_dir runs/vit-digits
    # without --codistill: a plain Trainer recipe, the all-reduce baseline

Data: `--dataset_name` (a Hub data set, or `digits` / `fashion_mnist`, which install offline), or `--train_dir`
(an imagefolder). With neither, scikit-learn's digits are used.
"""

from hf_codistill import CodistillTrainer
from hf_codistill.recipes import (
    ImageDataArguments,
    ModelArguments,
    build_models,
    classification_metrics,
    publish,
    select_splits,
    start_recipe,
    train_and_evaluate,
)
from hf_codistill.recipes.images import (
    ImageTransform,
    build_image_classifier,
    collate_images,
    load_image_data,
    normalisation,
)


def main():
    model_args, data_args, training_args = start_recipe(ModelArguments, ImageDataArguments)

    raw, data_description = load_image_data(data_args, model_args, training_args.seed,
                                            needs_validation=training_args.do_eval)

    labels = raw["train"].features[data_args.label_column_name].names
    first_image = raw["train"][0][data_args.image_column_name]
    num_channels = 1 if first_image.mode in ("L", "1", "I", "F") else 3
    mean, std, image_size = normalisation(model_args, num_channels, first_image.size[0], data_args.image_size)

    model = build_models(training_args, lambda: build_image_classifier(model_args, labels, image_size, num_channels))
    config = (model[0] if isinstance(model, list) else model).config
    transform = ImageTransform(mean, std, image_size, config.num_channels,
                               crop_padding=data_args.random_crop_padding, flip=data_args.random_flip)
    columns = (data_args.image_column_name, data_args.label_column_name)

    train_dataset, eval_dataset = select_splits(raw, data_args, training_args)
    if train_dataset is not None:
        train_dataset.set_transform(transform.for_batches(*columns, train=True))
    if eval_dataset is not None:
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
    train_and_evaluate(trainer, training_args, train_dataset, eval_dataset)
    publish(trainer, training_args, finetuned_from=model_args.model_name_or_path, tasks="image-classification",
            dataset=data_description, tags=["image-classification", "vision"])


if __name__ == "__main__":
    main()
