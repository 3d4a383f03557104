#!/usr/bin/env bash
# Step overhead on one GPU (issue 6, part 1): plain Trainer step vs CodistillTrainer step, bf16, models built from
# their configs on random data: BERT-base MLM 64x128, GPT-2 small CLM 16x512, ViT-base 128x224². Six fresh processes
# (one per case and mode), 20 timed steps each after 5 warm-up steps; about 2-3 minutes on an H100, bounded to 280 s;
# then GPT-2 once more with bfloat16 peers (about a minute, bounded to 120 s), and GPT-2 and BERT with the term at
# a quarter of the positions (bounded to 150 s): at most 550 s in all.
# Prints the Markdown tables for benchmarks/README.md (time and peak memory, then the peak of each phase of a step);
# the tables and each process's JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_step_overhead}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 280 python3 benchmarks/step_overhead.py --device cuda --bf16 --steps 20 --warmup 5 --timeout 120 \
    --json "$OUT/step_overhead.json" 2>&1 | tee "$OUT/step_overhead.txt"
echo "rc=${PIPESTATUS[0]}"
# The case that decides the targets, once more with the peer held in bfloat16 (`--codistill_peer_dtype bfloat16`).
timeout 120 python3 benchmarks/step_overhead.py --device cuda --bf16 --steps 20 --warmup 5 --timeout 55 \
    --cases gpt2-clm --peer_dtype bfloat16 --json "$OUT/step_overhead_bf16_peers.json" 2>&1 \
    | tee "$OUT/step_overhead_bf16_peers.txt"
echo "rc=${PIPESTATUS[0]}"
# ... and with `--codistill_position_fraction 0.25`: the term and the peer's head at a quarter of the positions
# (GPT-2); for BERT's 15% masking, every masked token at a count fixed by the shape, without the gather's host sync.
timeout 150 python3 benchmarks/step_overhead.py --device cuda --bf16 --steps 20 --warmup 5 --timeout 55 \
    --cases gpt2-clm,bert-mlm --position_fraction 0.25 --json "$OUT/step_overhead_quarter_positions.json" 2>&1 \
    | tee "$OUT/step_overhead_quarter_positions.txt"
echo "rc=${PIPESTATUS[0]}"
