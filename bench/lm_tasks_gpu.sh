#!/usr/bin/env bash
# Issue #17's SmolLM2-135M-Instruct runs (bench/lm_tasks.py), all at once on one GPU, one
# process per run, then the README tables.
#
#   bench/lm_tasks_gpu.sh DATA_DIR OUTDIR
#
# A (SST-2 prompt, label tokens): zero-shot, SpaRTA and LoRA r=8 for seeds $SST2_SEEDS.
# B (Textual MNIST as an LM task): zero-shot, RIGSA, SpaRTA and LoRA for seeds $MNIST_SEEDS.
# Each run writes OUTDIR/<run>.json and OUTDIR/<run>.log (steps and loss every 25 steps).
#
# Environment:
#   TIMEOUT=330      seconds per run; at TIMEOUT - RESERVE training stops early (the table
#   RESERVE=100      shows "steps of planned") so evaluation and forgetting still fit
#   DEVICE=cuda      cpu for a dry run
#   QUICK=1          a few steps and examples (the code path only: CPU dry run)
#   SERIAL=1         one run after another instead of all at once (a small CPU)
#   OMP_NUM_THREADS=2  CPU threads per run
#   SST2_SEEDS="0 1 2"  MNIST_SEEDS="0"
#   SST2_ARGS / MNIST_ARGS  extra options for every run of a part, e.g.
#                    MNIST_ARGS="--max-steps 2000 --batch-size 16 --eval-examples 1000"
set -u
if [ $# -ne 2 ]; then
    echo "usage: $0 DATA_DIR OUTDIR" >&2
    exit 2
fi
data=$1
out=$2
cd "$(dirname "$0")/.."
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # many processes share the CPU cores
timeout_s=${TIMEOUT:-330}
deadline=$((timeout_s - ${RESERVE:-100}))
common=(--device "${DEVICE:-cuda}" --data-dir "$data" --workdir "$out/work"
        --deadline-s "$deadline")
if [ "${QUICK:-0}" = 1 ]; then
    common+=(--quick)
fi

launch() {  # launch NAME ARGS...: one run of bench/lm_tasks.py, killed after $timeout_s
    local name=$1
    shift
    local cmd=(timeout -k 20 "$timeout_s" python bench/lm_tasks.py "${common[@]}" "$@"
               --out "$out/$name.json")
    echo "$name: ${cmd[*]}" >&2
    if [ "${SERIAL:-0}" = 1 ]; then
        "${cmd[@]}" >"$out/$name.log" 2>&1
    else
        "${cmd[@]}" >"$out/$name.log" 2>&1 &
    fi
}

start=$(date +%s)
# shellcheck disable=SC2086  # *_ARGS are word lists on purpose
{
    launch sst2-zero-shot --part sst2 --runs zero-shot ${SST2_ARGS:-}
    for seed in ${SST2_SEEDS:-0 1 2}; do
        for method in sparta lora; do
            launch "sst2-$method-s$seed" --part sst2 --runs "$method" --seed "$seed" \
                ${SST2_ARGS:-}
        done
    done
    launch mnist-zero-shot --part mnist --runs zero-shot ${MNIST_ARGS:-}
    for seed in ${MNIST_SEEDS:-0}; do
        for method in rigsa sparta lora; do
            launch "mnist-$method-s$seed" --part mnist --runs "$method" --seed "$seed" \
                ${MNIST_ARGS:-}
        done
    done
}
wait
echo "all runs done in $(( $(date +%s) - start )) s" >&2
for log in "$out"/*.log; do
    echo "== $log: $(tail -n 1 "$log" | cut -c1-300)" >&2
done
python bench/lm_tasks.py --table "$out"/*.json
