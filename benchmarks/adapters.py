#!/usr/bin/env python
"""What LoRA peers cost: bytes per exchange and peer memory with whole-model peers and with adapter peers.

With `peft` (`--use_peft` in the recipes, `peft_config=` for `CodistillTrainer`), a group holds each peer as one more
adapter on its own base model and exchanges adapters only (`hf_codistill/adapters.py`). Two parts:

- exact counts for the recipes' models (all-MiniLM-L6-v2 with its MLM head, the CLM recipe's default GPT-2, GPT-2
  small and the ViT recipe's default, all built from configs): what a group sends per exchange ((G-1) x P sharded)
  and what each rank holds for its peers ((G-1) x P), whole models vs LoRA r = 8 on peft's default target modules;
- measured: the MLM recipe on 2 groups x 2 CPU processes, 10 steps, with and without `--use_peft`: the exchange
  counters it logs and the largest peak RSS of one process.

    python benchmarks/adapters.py                  # ~4 min on 2 cores; prints two Markdown tables
    python benchmarks/adapters.py --smoke          # the ViT counts only (tests/test_benchmarks_smoke.py)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def recipe_models(smoke: bool):
    """(name, model) of the recipes' models, built from configs (no download)."""
    from transformers import AutoConfig, AutoModelForMaskedLM, GPT2Config, GPT2LMHeadModel

    from hf_codistill.recipes.arguments import ModelArguments
    from hf_codistill.recipes.data import minilm_path
    from hf_codistill.recipes.images import build_image_classifier

    vit = build_image_classifier(ModelArguments(), [str(label) for label in range(10)], image_size=28, num_channels=1)
    models = [("ViT (recipe default, Fashion-MNIST)", vit)]
    if smoke:
        return models
    minilm = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(minilm_path()))
    models += [("all-MiniLM-L6-v2 MLM", minilm),
               ("GPT-2 (CLM recipe default, 4 x 128)", GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=4, n_head=4))),
               ("GPT-2 small (124M)", GPT2LMHeadModel(GPT2Config()))]
    return models


def counts(name, model, rank: int = 8) -> dict:
    from peft import LoraConfig, get_peft_model

    from hf_codistill.exchange import exchanged_tensors

    whole = sum(t.numel() * t.element_size() for t in exchanged_tensors(model).values())
    target = ["q_proj", "v_proj"] if "ViT" in name else None  # peft's defaults miss ViT's renamed modules
    adapted = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target))
    adapter = sum(t.numel() * t.element_size() for t in exchanged_tensors(adapted).values())
    return {"model": name, "whole_bytes": whole, "adapter_bytes": adapter, "fraction": adapter / whole}


def measure_recipe(use_peft: bool, out: str) -> dict:
    """The MLM recipe, 2 groups x 2 processes, 10 steps: logged exchange counters and the largest peak RSS."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", "29791",
               os.path.join(REPO, "recipes", "run_mlm.py"), "--do_train", "--max_steps", "10", "--logging_steps", "10",
               "--per_device_train_batch_size", "8", "--max_seq_length", "64", "--max_train_samples", "512",
               "--codistill", "--num_groups", "2", "--codistill_sync_every", "5", "--save_strategy", "no",
               "--report_to", "none", "--output_dir", out, *(["--use_peft", "--lora_r", "8"] if use_peft else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest descendant so far
    with open(os.path.join(out, "group_0", "trainer_state.json")) as f:
        logs = [entry for entry in json.load(f)["log_history"] if "peer_exchanges" in entry][-1]
    return {"use_peft": use_peft, "exchanges": logs["peer_exchanges"],
            "bytes_sent_per_rank": logs["peer_exchange_bytes_sent"], "peak_rss_mb_so_far": peak_kb / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = [counts(name, model) for name, model in recipe_models(args.smoke)]
    print("| model | whole model P | LoRA r=8 adapter | adapter / P | peer memory per rank, G=4: whole | LoRA |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['whole_bytes'] / 1e6:.2f} MB | {r['adapter_bytes'] / 1e6:.3f} MB | "
              f"{r['fraction']:.4f} | {3 * r['whole_bytes'] / 1e6:.1f} MB | {3 * r['adapter_bytes'] / 1e6:.2f} MB |")
    measured = []
    if not args.smoke:
        with tempfile.TemporaryDirectory() as work:
            # The LoRA run first: RUSAGE_CHILDREN keeps the largest peak seen, so the smaller run must come first.
            for use_peft in (True, False):
                measured.append(measure_recipe(use_peft, os.path.join(work, f"peft_{use_peft}")))
        print("\n| MLM recipe, 2 x 2 processes | exchanges | bytes sent per rank | largest peak RSS so far |")
        print("|---|---|---|---|")
        for m in measured:
            print(f"| {'LoRA r=8' if m['use_peft'] else 'whole model'} | {m['exchanges']} | "
                  f"{m['bytes_sent_per_rank']:,} | {m['peak_rss_mb_so_far']:.0f} MB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"counts": rows, "measured": measured}, f, indent=2)


if __name__ == "__main__":
    main()
