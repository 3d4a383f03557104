#!/usr/bin/env bash
# GPU smoke check of the core trainer (one GPU): the NCCL column process group builds and all-gathers, and a
# 2-group codistillation run (2 processes sharing the GPU, gloo between them since NCCL needs one GPU per rank)
# trains in bf16, with gradient checkpointing, and with torch.compile. Prints a summary; logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_smoke}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 - <<'PY' 2>&1 | tee "$OUT/nccl.log"
import datetime, torch, torch.distributed as dist
from hf_codistill.topology import _make_process_group
torch.cuda.set_device(0)
store = dist.TCPStore("127.0.0.1", 29611, 1, True)
pg = _make_process_group("nccl", dist.PrefixStore("t", store), 0, 1, datetime.timedelta(seconds=60))
x = torch.arange(4.0, device="cuda"); out = [torch.empty_like(x)]
pg.allgather([out], [x]).wait(); torch.cuda.synchronize()
print("nccl column allgather ok:", out[0].tolist(), torch.__version__, torch.cuda.get_device_name())
PY
run() {  # name, extra args
  local name=$1; shift
  rm -rf "$OUT/$name"; mkdir -p "$OUT/$name/results"
  timeout 240 torchrun --nproc_per_node 2 --master_port 29622 tests/scripts/train_digits.py --output_dir /tmp/gs_$name \
    --codistill --num_groups 2 --codistill_sync_every 3 --ddp_backend gloo --per_device_train_batch_size 64 \
    --max_steps 12 --logging_steps 4 --save_steps 6 --report_to none --learning_rate 1e-3 "$@" \
    --x-results=$OUT/$name/results > "$OUT/$name/log.txt" 2>&1
  echo "$name rc=$?"
  python3 - "$OUT/$name/results" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/rank*.json")):
    r = json.load(open(f)); last = [e for e in r["log_history"] if "loss" in e][-1]
    print(f"  rank {r['world_rank']} group {r['group_index']}: loss {last['loss']:.4f} task {last.get('task_loss', 0):.4f} "
          f"distill {last.get('distill_loss', 0):.5f} bytes {last.get('peer_exchange_bytes_sent')} eval {r['eval']['eval_loss']:.4f}")
PY
}
run bf16 --bf16
run bf16_gc --bf16 --gradient_checkpointing
run compiled --bf16 --torch_compile
grep -h "Error\|error" "$OUT"/*/log.txt | grep -v "^W\|Warning" | sort | uniq -c | head -20
