#!/usr/bin/env python
"""Churn between retrainings, and codistillation where all-reduce's batch has stopped scaling (issue 17).

    python benchmarks/science/churn_study.py                  # both parts (about 1 h 45 min on 2 shared cores)
    python benchmarks/science/churn_study.py --only churn     # a part: churn | batch
    python benchmarks/science/churn_study.py --report-only    # tables, plots and README block from results/
    python benchmarks/science/churn_study.py --smoke --out /tmp/s   # digits and 32 articles, under a minute

Churn (Anil et al. 2018: codistillation "dramatically reduces churn"): each method is trained twice, retraining A
with seed s and retraining B with seed s + 100, and churn is the fraction of test examples whose top-1 prediction
differs between A's model and B's (for the pairs also between A's and B's ensembles). Tasks: the science study's
ViT on Fashion-MNIST from scratch, and all-MiniLM-L6-v2 fine-tuned on BBC News.

Batch regime (Shallue et al. 2019; the regime of Anil et al. and Sodhani et al.): the steps one ViT needs to reach a
target test accuracy at each batch size, then, past the batch where doubling it stops halving the steps, all-reduce
at 2B against codistillation and the independent pair at B per model, equal steps.

Every run is one process (`CodistillTrainer` with a list of models for the pairs; no launcher), so each uses one
core; `--jobs` runs that many at once. A run's results file is reused when its settings are unchanged.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import multiprocessing
import os
import platform
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = {"single": "ordinary training (1 model)", "codistill": "codistillation (2 models)",
           "independent": "independent pair (alpha = 0)"}
RETRAIN_OFFSET = 100  # retraining B's seed is retraining A's plus this
MARKERS = {"churn": "churn-study", "batch": "batch-regime"}  # <!-- name:begin --> ... <!-- name:end --> in README

# Settings of each task. ViT: the science study's model and optimiser; BBC: a short fine-tuning of a fresh head.
TASKS = {
    "vit": dict(data="fashion_mnist", steps=800, batch=64, lr=2e-3, scheduler="cosine", warmup=0.05,
                weight_decay=0.3, sync_every=50, test_samples=None),
    "bbc": dict(data="bbc_news", steps=80, batch=8, lr=1e-4, scheduler="linear", warmup=0.1, weight_decay=0.01,
                sync_every=10, max_seq_length=64, test_samples=None),
}
SMOKE_TASKS = {
    "vit": dict(TASKS["vit"], data="digits", steps=4, batch=16, test_samples=64),
    "bbc": dict(TASKS["bbc"], steps=2, batch=4, max_seq_length=32, train_samples=32, test_samples=16),
}
# The batch sweep: one ViT, constant LR after a warm-up, LR scaled with sqrt(batch) from the study's 2e-3 at 128.
SWEEP = dict(batches=(16, 32, 64, 128, 256, 512, 1024), target=0.80, curve_samples=2000, examples_cap=250_000,
             min_steps=300, lr_at_128=2e-3, warmup_steps=20, weight_decay=0.3)
SMOKE_SWEEP = dict(SWEEP, batches=(8, 16), target=0.3, curve_samples=64, examples_cap=256, min_steps=10,
                   compare_steps=4)


def sweep_lr(batch: int, sweep: dict) -> float:
    return sweep["lr_at_128"] * math.sqrt(batch / 128)


@dataclass(frozen=True)
class Run:
    """One training run: `method` on `task` with `seed`; a pair trains models seed and seed + 1 side by side."""

    part: str  # churn | sweep | compare
    task: str
    method: str
    seed: int
    steps: int
    batch: int  # per model
    lr: float
    scheduler: str
    warmup: float
    weight_decay: float
    sync_every: int
    max_seq_length: int = 0
    train_samples: int | None = None
    test_samples: int | None = None
    curve_every: int = 0  # evaluate on `curve_samples` test examples every this many steps (0: only at the end)
    curve_samples: int = 0
    target: float | None = None  # stop once model 0 reaches this accuracy on the curve's examples
    data: str = "fashion_mnist"

    @property
    def name(self) -> str:
        return f"{self.task}_{self.method}_b{self.batch}_s{self.seed}"


# ---- Data and models ------------------------------------------------------------------------------------------------


class TensorExamples(torch.utils.data.Dataset):
    """Images transformed once (the recipe's `ImageTransform`), served as the recipe's `collate_images` expects."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor):
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixels[index], "labels": int(self.labels[index])}


@functools.cache
def image_task(data: str):
    """(train, test, labels, side) of Fashion-MNIST or, for the smoke test, scikit-learn's digits."""
    from hf_codistill.recipes.data import BUILTIN_IMAGE_DATASETS
    from hf_codistill.recipes.images import ImageTransform

    raw = BUILTIN_IMAGE_DATASETS[data]()
    side = raw["train"][0]["image"].size[0]
    transform = ImageTransform([0.5], [0.5], side, 1)
    splits = [TensorExamples(torch.stack([transform(image, train=False) for image in raw[split]["image"]]),
                             torch.tensor(raw[split]["label"])) for split in ("train", "validation")]
    return (*splits, raw["train"].features["label"].names, side)


@functools.cache
def text_task(max_seq_length: int, train_samples: int | None):
    """(train, test, labels, tokenizer) of the BBC News articles, tokenised as the classification recipe does."""
    from hf_codistill import CodistillTrainingArguments
    from hf_codistill.recipes import ClassificationDataArguments, ModelArguments
    from hf_codistill.recipes.classification import load_classification_data, tokenize_examples
    from hf_codistill.recipes.data import minilm_path
    from hf_codistill.recipes.text import load_tokenizer
    from hf_codistill.recipes.workflow import truncate

    data_args = ClassificationDataArguments(max_seq_length=max_seq_length)
    model_args = ModelArguments(model_name_or_path=minilm_path())
    data = load_classification_data(data_args, model_args, do_predict=True)
    tokenizer = load_tokenizer(model_args)
    args = CodistillTrainingArguments(output_dir=os.devnull, report_to="none", use_cpu=True)
    train, test = (tokenize_examples(data, split, truncate(data.raw[split], limit), tokenizer, data_args, args)
                   for split, limit in (("train", train_samples), ("test", None)))
    return train, test, data.labels, tokenizer


def task_setup(run: Run):
    """(train, test, collator, build) for a run: `build()` makes one fresh model (the recipes' builders)."""
    from transformers import DataCollatorWithPadding

    from hf_codistill.recipes import ModelArguments
    from hf_codistill.recipes.classification import build_text_classifier
    from hf_codistill.recipes.data import minilm_path
    from hf_codistill.recipes.images import build_image_classifier, collate_images

    if run.task == "bbc":
        train, test, labels, tokenizer = text_task(run.max_seq_length, run.train_samples)
        model_args = ModelArguments(model_name_or_path=minilm_path())
        return train, test, DataCollatorWithPadding(tokenizer), lambda: build_text_classifier(model_args, labels)
    train, test, labels, side = image_task(run.data)
    if run.train_samples:
        train = torch.utils.data.Subset(train, range(run.train_samples))
    return train, test, collate_images, lambda: build_image_classifier(ModelArguments(), labels, side, 1)


@torch.no_grad()
def predict_logits(model, dataset, collator, limit: int | None = None, batch_size: int = 250) -> np.ndarray:
    """The model's logits on the first `limit` examples of `dataset`, in eval mode (left as it was found)."""
    was_training = model.training
    model.eval()
    count = len(dataset) if limit is None else min(limit, len(dataset))
    outputs = []
    for start in range(0, count, batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, count))])
        batch.pop("labels", None)
        outputs.append(model(**batch).logits.float())
    model.train(was_training)
    return torch.cat(outputs).numpy()


def test_labels(dataset, limit: int | None = None) -> np.ndarray:
    count = len(dataset) if limit is None else min(limit, len(dataset))
    return np.array([int(dataset[i]["labels"]) for i in range(count)])


def ensemble_ids(logits: list[np.ndarray]) -> np.ndarray:
    """Top-1 of the mean of the models' probabilities (`hf_codistill.peer_metrics.ensemble_logits`)."""
    from hf_codistill.peer_metrics import ensemble_logits

    return ensemble_logits([torch.from_numpy(x) for x in logits]).argmax(-1).numpy()


# ---- One run --------------------------------------------------------------------------------------------------------


def training_args(run: Run, output_dir: str):
    from hf_codistill import CodistillTrainingArguments

    extra = {}
    if run.method != "single":
        extra = dict(codistill=True, num_groups=2, codistill_alpha=0.0 if run.method == "independent" else 1.0,
                     codistill_sync_every=run.sync_every, codistill_peer_metrics=False)
    return CodistillTrainingArguments(
        output_dir=output_dir, max_steps=run.steps, per_device_train_batch_size=run.batch, learning_rate=run.lr,
        lr_scheduler_type=run.scheduler, warmup_steps=run.warmup, weight_decay=run.weight_decay,
        logging_steps=max(1, run.steps // 20), save_strategy="no", eval_strategy="no", report_to="none",
        use_cpu=True, seed=run.seed, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        **extra)


def make_curve_callback(models, test, collator, run: Run, curve: list):
    """Test accuracy of every model every `run.curve_every` steps; stops training once model 0 reaches the target."""
    from transformers import TrainerCallback

    labels = test_labels(test, run.curve_samples)

    class TestCurve(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % run.curve_every and state.global_step != state.max_steps:
                return
            accuracies = [float((predict_logits(m, test, collator, run.curve_samples).argmax(-1) == labels).mean())
                          for m in models]
            curve.append({"step": state.global_step, "accuracy": accuracies})
            if run.target is not None and accuracies[0] >= run.target:
                control.should_training_stop = True

    return TestCurve()


def train_run(run: Run, work_dir: str) -> dict:
    """Train `run`, then score its models and their ensemble on the test set; top-1 ids kept for churn."""
    torch.set_num_threads(1)
    import transformers
    from transformers import PrinterCallback

    from hf_codistill import CodistillTrainer
    from hf_codistill.recipes import build_models

    transformers.utils.logging.set_verbosity_error()
    train, test, collator, build = task_setup(run)
    args = training_args(run, os.path.join(work_dir, run.part, run.name))
    models = build_models(args, build)
    models = models if isinstance(models, list) else [models]
    curve: list = []
    callbacks = [make_curve_callback(models, test, collator, run, curve)] if run.curve_every else []
    trainer = CodistillTrainer(model=models if len(models) > 1 else models[0], args=args, train_dataset=train,
                               data_collator=collator, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # the logs stay in `trainer.state.log_history`; no dict per log line
    start = time.time()
    trainer.train()
    train_seconds = time.time() - start
    logits = [predict_logits(m, test, collator, run.test_samples) for m in models]
    labels = test_labels(test, run.test_samples)
    ids = [x.argmax(-1) for x in logits] + ([ensemble_ids(logits)] if len(models) > 1 else [])
    return {
        "run": asdict(run), "name": run.name, "models": len(models), "steps_done": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1), "train_and_test_seconds": round(time.time() - start, 1),
        "accuracy": [float((i == labels).mean()) for i in ids[: len(models)]],
        "ensemble_accuracy": float((ids[-1] == labels).mean()) if len(models) > 1 else None,
        "test_examples": len(labels),
        # top-1 ids of model 0, model 1, ensemble as digit strings (fewer than 10 classes): churn is computed later
        "predictions": ["".join(map(str, i.tolist())) for i in ids],
        "curve": curve,
    }


def library_state() -> dict:
    """The commit the run's library came from, and its files that differed from it (uncommitted edits)."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.split()

    return {"commit": (git("rev-parse", "HEAD") or [None])[0],
            "modified": git("status", "--porcelain", "--", os.path.join(HERE, "..", "..", "hf_codistill"))[1::2]}


def _worker(run: Run, work_dir: str, path: str) -> str:
    result = {**train_run(run, work_dir), "library": library_state()}
    write_json(path, result)
    return path


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def result_path(results_dir: str, run: Run) -> str:
    return os.path.join(results_dir, "churn" if run.part == "churn" else "batch_regime", f"{run.part}_{run.name}.json")


def execute(runs: list[Run], results_dir: str, work_dir: str, jobs: int, force: bool) -> None:
    """Run what has no results file with the same settings, `jobs` at a time (one thread each)."""
    todo = []
    for run in runs:
        path = result_path(results_dir, run)
        if not force and os.path.isfile(path) and json.load(open(path))["run"] == asdict(run):
            continue
        todo.append((run, path))
    print(f"{len(runs)} runs, {len(todo)} to train", flush=True)
    if jobs <= 1:
        for run, path in todo:
            _worker(run, work_dir, path)
            print(f"done {path}", flush=True)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(_worker, run, work_dir, path): path for run, path in todo}
        for future in concurrent.futures.as_completed(futures):
            print(f"done {future.result()}", flush=True)


# ---- Plans ----------------------------------------------------------------------------------------------------------


def churn_runs(tasks: dict, seeds: list[int]) -> list[Run]:
    runs = []
    for task, settings in tasks.items():
        for method in METHODS:
            for seed in seeds:
                for retrain in (seed, seed + RETRAIN_OFFSET):
                    runs.append(Run(
                        "churn", task, method, retrain, settings["steps"], settings["batch"], settings["lr"],
                        settings["scheduler"], settings["warmup"], settings["weight_decay"], settings["sync_every"],
                        settings.get("max_seq_length", 0), settings.get("train_samples"), settings["test_samples"],
                        data=settings["data"]))
    return runs


def sweep_run(batch: int, seed: int, sweep: dict, data: str, steps: int | None = None, method: str = "single",
              target: float | None = None, per_model_lr_batch: int | None = None) -> Run:
    """A run of the batch part: constant LR after the warm-up, LR from the batch, test curve on `curve_samples`."""
    steps = steps or max(sweep["min_steps"], sweep["examples_cap"] // batch)
    every = max(1, steps // 10) if target is None else max(2 if data == "digits" else 5, 1024 // batch)
    return Run("sweep" if target is not None else "compare", "vit", method, seed, steps, batch,
               sweep_lr(per_model_lr_batch or batch, sweep), "constant_with_warmup", sweep["warmup_steps"],
               sweep["weight_decay"], max(1, steps // 6), test_samples=sweep["curve_samples"] * 5 if data != "digits"
               else None, curve_every=every, curve_samples=sweep["curve_samples"], target=target, data=data)


def steps_to_target(result: dict, target: float) -> int | None:
    return next((point["step"] for point in result["curve"] if point["accuracy"][0] >= target), None)


def knee(steps: dict[int, float]) -> int | None:
    """The smallest batch from which every doubling cuts the steps to the target by less than a third (ratio < 1.5):
    one noisy ratio below it does not count (a single seed's steps move by a few evaluations)."""
    batches = [b for b in sorted(steps) if steps[b]]
    ratios = [steps[small] / steps[large] for small, large in zip(batches, batches[1:])]
    for i, batch in enumerate(batches[:-1]):
        if all(ratio < 1.5 for ratio in ratios[i:]):
            return batch
    return None


# ---- Report ---------------------------------------------------------------------------------------------------------


def mean_sd(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values)}


def fmt(cell: dict, scale: float = 100, digits: int = 1) -> str:
    if cell["mean"] is None:
        return "—"
    sd = f" ± {cell['sd'] * scale:.{digits}f}" if cell["sd"] is not None else ""
    return f"{cell['mean'] * scale:.{digits}f}{sd}"


def differ(a: str, b: str) -> float:
    return float(np.mean(np.frombuffer(a.encode(), np.uint8) != np.frombuffer(b.encode(), np.uint8)))


def churn_summary(results: list[dict], seeds: list[int]) -> dict:
    """Per task and method: churn A vs B (model 0, model 1, ensemble), peers' disagreement, accuracy, cost."""
    by_key = {(r["run"]["task"], r["run"]["method"], r["run"]["seed"]): r for r in results}
    summary = {}
    for task in sorted({r["run"]["task"] for r in results}):
        for method in METHODS:
            pairs = [(by_key.get((task, method, s)), by_key.get((task, method, s + RETRAIN_OFFSET))) for s in seeds]
            pairs = [(a, b) for a, b in pairs if a and b]
            if not pairs:
                continue
            runs = [r for pair in pairs for r in pair]
            two = runs[0]["models"] == 2
            row = {
                "seed_pairs": len(pairs),
                "churn_model0": mean_sd([differ(a["predictions"][0], b["predictions"][0]) for a, b in pairs]),
                "churn_model1": mean_sd([differ(a["predictions"][1], b["predictions"][1]) for a, b in pairs]
                                        if two else []),
                "churn_ensemble": mean_sd([differ(a["predictions"][2], b["predictions"][2]) for a, b in pairs]
                                          if two else []),
                "within_run_disagreement": mean_sd([differ(r["predictions"][0], r["predictions"][1]) for r in runs]
                                                   if two else []),
                "accuracy_model0": mean_sd([r["accuracy"][0] for r in runs]),
                "accuracy_models": mean_sd([acc for r in runs for acc in r["accuracy"]]),
                "ensemble_accuracy": mean_sd([r["ensemble_accuracy"] for r in runs]),
                "steps": runs[0]["run"]["steps"], "models": runs[0]["models"], "batch": runs[0]["run"]["batch"],
                "model_steps": runs[0]["run"]["steps"] * runs[0]["models"],
                "peer_forwards_per_step": 2 if method == "codistill" else 0,
                "train_seconds": mean_sd([r["train_seconds"] for r in runs]),
                "test_examples": runs[0]["test_examples"],
                "settings": {k: v for k, v in runs[0]["run"].items() if k not in ("seed", "method", "part")},
            }
            summary.setdefault(task, {})[method] = row
    return summary


def _comparison_order(run: dict) -> tuple[int, int]:
    """All-reduce at 2B, then the pairs at B per model; by B."""
    per_model = run["batch"] // 2 if run["method"] == "single" else run["batch"]
    return per_model, list(METHODS).index(run["method"])


def batch_summary(sweep: list[dict], compare: list[dict], target: float) -> dict:
    steps = {}
    for r in sweep:
        steps.setdefault(r["run"]["batch"], []).append(steps_to_target(r, target))
    table = {b: {"steps_to_target": mean_sd(v), "lr": sweep_lr(b, SWEEP), "examples_to_target": mean_sd(
        [s * b if s else None for s in v]), "per_seed": v} for b, v in sorted(steps.items())}
    means = {b: row["steps_to_target"]["mean"] for b, row in table.items()}
    rows = {}
    for r in compare:
        key = f"{r['run']['method']}_b{r['run']['batch']}"
        rows.setdefault(key, []).append(r)
    comparison = {key: {
        "method": runs[0]["run"]["method"], "batch_per_model": runs[0]["run"]["batch"], "models": runs[0]["models"],
        "steps": runs[0]["run"]["steps"], "lr": runs[0]["run"]["lr"], "seeds": sorted(r["run"]["seed"] for r in runs),
        "accuracy_model0": mean_sd([r["accuracy"][0] for r in runs]),
        "accuracy_models": mean_sd([a for r in runs for a in r["accuracy"]]),
        # less noisy than the last evaluation under a constant LR: the last 3 curve points, all models
        "late_accuracy": mean_sd([float(np.mean([p["accuracy"] for p in r["curve"][-3:]])) for r in runs]),
        "ensemble_accuracy": mean_sd([r["ensemble_accuracy"] for r in runs]),
        "within_run_disagreement": mean_sd([differ(*r["predictions"][:2]) for r in runs if r["models"] == 2]),
        "train_seconds": mean_sd([r["train_seconds"] for r in runs]), "test_examples": runs[0]["test_examples"],
    } for key, runs in sorted(rows.items(), key=lambda item: _comparison_order(item[1][0]["run"]))}
    return {"target": target, "sweep": table, "knee": knee(means), "comparison": comparison}


def plot_churn(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4 * len(tasks)), squeeze=False)
    axes = axes.ravel()
    colors = {"single": "tab:gray", "codistill": "tab:blue", "independent": "tab:orange"}
    for t, task in enumerate(tasks):
        bars = [(method, kind) for method in METHODS if method in summary[task]
                for kind in (("model0", "ensemble") if summary[task][method]["models"] == 2 else ("model0",))]
        ax = axes[2 * t]
        for i, (method, kind) in enumerate(bars):
            cell = summary[task][method][f"churn_{kind}"]
            ax.bar(i, cell["mean"] * 100, yerr=(cell["sd"] or 0) * 100, color=colors[method], capsize=4,
                   hatch="//" if kind == "ensemble" else None, alpha=0.9)
        ax.set_xticks(range(len(bars)), [f"{m}\n{'ensemble' if k == 'ensemble' else 'model 0'}" for m, k in bars],
                      fontsize=8)
        ax.set_ylabel("churn between retrainings (% of test set)")
        ax.set_title(f"{task}: churn A vs B (mean ± s.d. over seed pairs)")
        ax = axes[2 * t + 1]
        for i, (method, kind) in enumerate(bars):
            row = summary[task][method]
            cell = row["ensemble_accuracy"] if kind == "ensemble" else row["accuracy_model0"]
            ax.bar(i, cell["mean"] * 100, yerr=(cell["sd"] or 0) * 100, color=colors[method], capsize=4,
                   hatch="//" if kind == "ensemble" else None, alpha=0.9)
        low = min(summary[task][m]["accuracy_model0"]["mean"] for m in summary[task]) * 100
        ax.set_ylim(max(0, low - 8), 100)
        ax.set_xticks(range(len(bars)), [f"{m}\n{'ensemble' if k == 'ensemble' else 'model 0'}" for m, k in bars],
                      fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{task}: accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_batch(summary: dict, sweep: list[dict], compare: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    table = summary["sweep"]
    batches = [b for b in table if table[b]["steps_to_target"]["mean"]]
    if batches:
        means = [table[b]["steps_to_target"]["mean"] for b in batches]
        axes[0].loglog(batches, means, "o-", label="measured")
        axes[0].loglog(batches, [means[0] * batches[0] / b for b in batches], "k:", label="perfect scaling (1/B)")
        if summary["knee"]:
            axes[0].axvline(summary["knee"], color="tab:red", ls="--", label=f"knee: {summary['knee']}")
        axes[0].set_xticks(batches, [str(b) for b in batches])
    axes[0].set_xlabel("batch size")
    axes[0].set_ylabel(f"steps to {summary['target']:.0%} test accuracy")
    axes[0].set_title("steps vs batch (one ViT, all-reduce)")
    axes[0].legend(fontsize=8)
    for r in sorted(sweep, key=lambda r: r["run"]["batch"]):
        if r["run"]["seed"] == min(x["run"]["seed"] for x in sweep):
            axes[1].plot([p["step"] for p in r["curve"]], [p["accuracy"][0] * 100 for p in r["curve"]],
                         label=f"B={r['run']['batch']}")
    axes[1].axhline(summary["target"] * 100, color="k", ls=":")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("test accuracy (%)")
    axes[1].set_title("sweep curves (first seed)")
    axes[1].legend(fontsize=7)
    colors = {"single": "tab:gray", "codistill": "tab:blue", "independent": "tab:orange"}
    styles = {}
    for r in compare:
        key = (r["run"]["method"], r["run"]["batch"])
        styles.setdefault(key, []).append(r)
    largest = max((b for m, b in styles if m != "single"), default=0)
    for (method, batch), runs in sorted(styles.items()):
        ls = "-" if (batch if method != "single" else batch // 2) == largest else "--"
        steps = [p["step"] for p in runs[0]["curve"]]
        acc = np.mean([[np.mean(p["accuracy"]) for p in r["curve"]] for r in runs], axis=0) * 100
        label = f"{'all-reduce' if method == 'single' else method}, batch {batch}{'' if method == 'single' else ' x2'}"
        axes[2].plot(steps, acc, ls, color=colors[method], label=label)
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("test accuracy (%), mean of models and seeds")
    axes[2].set_title("all-reduce at 2B vs pairs at B per model")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def churn_tables(summary: dict) -> list[str]:
    lines = []
    for task, rows in summary.items():
        first = next(iter(rows.values()))
        s = first["settings"]
        what = ("ViT (the science study's, ~140k parameters) on Fashion-MNIST from scratch" if task == "vit"
                else f"all-MiniLM-L6-v2 + fresh head on BBC News, {s['max_seq_length']} tokens")
        lines += [f"#### {what}", "",
                  f"{first['steps']} steps, batch {first['batch']} per model, LR {s['lr']:g} ({s['scheduler']}, "
                  f"warm-up {s['warmup']:g}), weight decay {s['weight_decay']:g}, k = {s['sync_every']}; "
                  f"{first['test_examples']} test examples; {first['seed_pairs']} seed pairs. Values in %.", "",
                  "| method | churn A↔B, model 0 | churn A↔B, model 1 | churn A↔B, ensemble | accuracy, model 0 | "
                  "accuracy, ensemble | peers disagree (within a run) | model-steps | train s / run |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, row in rows.items():
            cost = f"{row['steps']} × {row['models']} = {row['model_steps']}"
            if row["peer_forwards_per_step"]:
                cost += " (+2 peer forwards / step)"
            lines.append(f"| {METHODS[method]} | {fmt(row['churn_model0'])} | {fmt(row['churn_model1'])} | "
                         f"{fmt(row['churn_ensemble'])} | {fmt(row['accuracy_model0'])} | "
                         f"{fmt(row['ensemble_accuracy'])} | {fmt(row['within_run_disagreement'])} | {cost} | "
                         f"{fmt(row['train_seconds'], 1, 0)} |")
        lines.append("")
    return lines


def batch_tables(summary: dict) -> list[str]:
    lines = [f"Steps to {summary['target']:.0%} accuracy on the first {SWEEP['curve_samples']} test images "
             f"(one ViT, AdamW, constant LR after {SWEEP['warmup_steps']} warm-up steps, LR = "
             f"{SWEEP['lr_at_128']:g} × sqrt(B / 128)):", "",
             "| batch | LR | steps to target (per seed) | mean | examples to target | steps(B/2) / steps(B) |",
             "|---|---|---|---|---|---|"]
    previous = None
    for batch, row in summary["sweep"].items():
        mean = row["steps_to_target"]["mean"]
        ratio = f"{previous / mean:.2f}" if previous and mean else "—"
        examples = row["examples_to_target"]["mean"]
        lines.append(f"| {batch} | {row['lr']:.2e} | {', '.join(str(s) for s in row['per_seed'])} | "
                     f"{'—' if mean is None else round(mean)} | {'—' if examples is None else round(examples)} | "
                     f"{ratio} |")
        previous = mean
    lines += ["", f"Knee (smallest B from which every doubling cuts the steps by less than a third): "
                  f"{summary['knee']}.",
              ""]
    if summary["comparison"]:
        first = next(iter(summary["comparison"].values()))
        lines += [f"Equal steps per comparison, final accuracy on {first['test_examples']} test images, mean ± s.d. "
                  "over seeds (all models: both models of each pair). Values in %.", "",
                  "| method | batch per model | models | steps | LR | accuracy, model 0 | accuracy, all models | "
                  f"ensemble | last 3 evaluations ({SWEEP['curve_samples']} images), all models | peers disagree | "
                  "seeds | train s / run |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in summary["comparison"].values():
            name = "all-reduce (1 model)" if row["method"] == "single" else METHODS[row["method"]]
            lines.append(f"| {name} | {row['batch_per_model']} | {row['models']} | {row['steps']} | {row['lr']:.2e} | "
                         f"{fmt(row['accuracy_model0'], digits=2)} | {fmt(row['accuracy_models'], digits=2)} | "
                         f"{fmt(row['ensemble_accuracy'], digits=2)} | {fmt(row['late_accuracy'], digits=2)} | "
                         f"{fmt(row['within_run_disagreement'])} | "
                         f"{','.join(map(str, row['seeds']))} | {fmt(row['train_seconds'], 1, 0)} |")
        lines.append("")
    return lines


def machine() -> str:
    import transformers

    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, transformers {transformers.__version__}"


def update_readme(path: str, part: str, block: str) -> None:
    """`block` between the part's markers in `path` (appended with them if absent): the text around them is prose."""
    begin, end = f"<!-- {MARKERS[part]}:begin -->", f"<!-- {MARKERS[part]}:end -->"
    folder = "churn" if part == "churn" else "batch_regime"
    text = open(path).read() if os.path.isfile(path) else ""
    generated = f"{begin}\n\n_Generated by `churn_study.py` from `results/{folder}/`; edit the text outside these " \
                f"markers._\n\n**Machine:** {machine()}\n\n{block}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: generated, text, flags=re.S)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + generated + "\n"
    with open(path, "w") as f:
        f.write(text)


def load(folder: str, prefix: str) -> list[dict]:
    if not os.path.isdir(folder):
        return []
    return [json.load(open(os.path.join(folder, n))) for n in sorted(os.listdir(folder))
            if n.startswith(prefix) and n.endswith(".json")]


def report(out: str, seeds: list[int], smoke: bool) -> None:
    results, plots = os.path.join(out, "results"), os.path.join(out, "plots")
    os.makedirs(plots, exist_ok=True)
    churn = load(os.path.join(results, "churn"), "churn_")
    if churn:
        summary = churn_summary(churn, seeds)
        write_json(os.path.join(results, "churn", "summary.json"), summary)
        plot_churn(summary, os.path.join(plots, "churn.png"))
        block = churn_tables(summary) + ["![churn](plots/churn.png)", ""]
        update_readme(os.path.join(out, "README.md"), "churn", "\n".join(block))
    sweep = load(os.path.join(results, "batch_regime"), "sweep_")
    compare = load(os.path.join(results, "batch_regime"), "compare_")
    if sweep:
        target = sweep[0]["run"]["target"]
        summary = batch_summary(sweep, compare, target)
        write_json(os.path.join(results, "batch_regime", "summary.json"), summary)
        plot_batch(summary, sweep, compare, os.path.join(plots, "batch_regime.png"))
        block = batch_tables(summary) + ["![batch regime](plots/batch_regime.png)", ""]
        update_readme(os.path.join(out, "README.md"), "batch", "\n".join(block))


# ---- Main -----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="churn,batch", help="churn | batch (comma-separated)")
    parser.add_argument("--tasks", default="vit,bbc", help="the churn part's tasks")
    parser.add_argument("--seeds", default="0,10,20", help="retraining A's seeds (B: + 100); spaced so that a "
                        "pair's second model (seed + 1) is no other run's model")
    parser.add_argument("--sweep_seeds", default="0")
    parser.add_argument("--compare_batches", default=None,
                        help="per-model batches B of the comparison (default: the sweep's knee)")
    parser.add_argument("--compare_seeds", default="0,1,2")
    parser.add_argument("--compare_steps", type=int, default=None,
                        help="default: twice the steps all-reduce needs at 2B to reach the target")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--out", default=HERE, help="where results/, plots/ and README.md go")
    parser.add_argument("--work_dir", default=None, help="run folders (default: <out>/runs/churn_study)")
    parser.add_argument("--smoke", action="store_true", help="digits and a few articles, a few steps, one seed")
    parser.add_argument("--report-only", "--report_only", dest="report_only", action="store_true")
    parser.add_argument("--force", action="store_true", help="rerun runs that already have results")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    seeds = [0] if args.smoke else [int(s) for s in args.seeds.split(",")]
    tasks = SMOKE_TASKS if args.smoke else TASKS
    sweep = SMOKE_SWEEP if args.smoke else SWEEP
    data = "digits" if args.smoke else "fashion_mnist"
    jobs = 1 if args.smoke else args.jobs
    results = os.path.join(args.out, "results")
    work_dir = args.work_dir or os.path.join(args.out, "runs", "churn_study")
    if not args.report_only:
        if "churn" in parts:
            chosen = {t: tasks[t] for t in args.tasks.split(",")}
            execute(churn_runs(chosen, seeds), results, work_dir, jobs, args.force)
        if "batch" in parts:
            sweep_seeds = [0] if args.smoke else [int(s) for s in args.sweep_seeds.split(",")]
            runs = [sweep_run(b, s, sweep, data, target=sweep["target"])
                    for b in sweep["batches"] for s in sweep_seeds]
            execute(runs, results, work_dir, jobs, args.force)
            found = {b: mean_sd([steps_to_target(json.load(open(result_path(results, r))), sweep["target"])
                                 for r in runs if r.batch == b])["mean"] for b in sweep["batches"]}
            chosen_knee = knee(found) or sweep["batches"][-2]
            batches = [int(b) for b in args.compare_batches.split(",")] if args.compare_batches else [chosen_knee]
            compare = []
            for b in batches:
                steps = args.compare_steps or sweep.get("compare_steps") or 2 * int(found.get(2 * b) or 100)
                for s in ([0] if args.smoke else [int(x) for x in args.compare_seeds.split(",")]):
                    compare += [sweep_run(2 * b, s, sweep, data, steps=steps)]
                    compare += [sweep_run(b, s, sweep, data, steps=steps, method=method)
                                for method in ("codistill", "independent")]
            execute(compare, results, work_dir, jobs, args.force)
    report(args.out, seeds, args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
