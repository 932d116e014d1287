#!/usr/bin/env bash
# Issue 19's sweep: SpaRTA's defaults vs LoRA r=8 at the same trainable count on MRPC and CoLA
# (full training sets, 3 epochs, MiniLM-L6), seeds 0, 1, 2, one bench/compare.py process per
# (task, seed, spec), JOBS of them at a time, then one table per task (mean ± std over seeds).
#
#   bench/issue19_sweep.sh DATA_DIR OUTDIR
#
# DATA_DIR holds glue/MRPC and glue/CoLA; OUTDIR receives one results JSON per run
# (<task>-<spec number>-s<seed>.json, every row with its exact command line), logs/ and the
# tables (<task>-table.md). Environment:
#   DEVICE   cuda (default) or cpu
#   JOBS     concurrent runs (default 24, ~1.5 per CPU core: the runs are launch-bound)
#   WORKDIR  where the adapters go (default /tmp/issue19-work)
#   BASE     the model folder (default: MiniLM-L6 from the demo extra)
#   QUICK=1  a dry run of the same code path: 64 training examples, 1 epoch, seed 0, the
#            first two specs
# Runs already in OUTDIR are skipped, so a rerun finishes an interrupted sweep. The last
# stdout line is a JSON summary {task: compare.py's summary, "failed": count}.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 DATA_DIR OUTDIR" >&2
    exit 2
fi
mkdir -p "$2/logs"
DATA_DIR=$(realpath "$1")  # absolute: the script runs from the repository root
OUTDIR=$(realpath "$2")
DEVICE=${DEVICE:-cuda}
JOBS=${JOBS:-24}
WORKDIR=${WORKDIR:-/tmp/issue19-work}
BASE_ARGS=()
if [[ -n ${BASE:-} ]]; then BASE_ARGS=(--base "$BASE"); fi
cd "$(dirname "$0")/.."

L=density=lora-r8  # SpaRTA at LoRA r=8's trainable count (both on every linear layer)
SPECS=(
    lora:rank=8                              # LoRA r=8, compare.py's LoRA defaults
    sparta:$L                                # new defaults (--lr auto: 3.19e-3, head 5e-3)
    sparta:$L:lr=2e-3                        # old defaults (lr 2e-3, head 1e-2)
    sparta:density=0.005                     # new defaults at 0.5% (lr 2e-2, head 5e-3)
    sparta:$L:weight_decay=1.0               # candidates: against MRPC's epoch-3 overfitting
    sparta:$L:lr=6.4e-3:head_lr=5e-3         # 2x auto (CoLA still underfits at epoch 2)
)
TASKS=(cola mrpc)  # CoLA first: its runs are the longest
SEEDS=(0 1 2)
EXTRA=(--epochs 3)
if [[ ${QUICK:-0} == 1 ]]; then
    SPECS=("${SPECS[@]:0:2}")
    SEEDS=(0)
    EXTRA=(--epochs 1 --max-train-examples 64)
fi

export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
names=()
for task in "${TASKS[@]}"; do
    for seed in "${SEEDS[@]}"; do
        for i in "${!SPECS[@]}"; do
            name=$task-$i-s$seed
            while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
            python bench/compare.py --task "$task" --data-dir "$DATA_DIR" "${EXTRA[@]}" \
                "${BASE_ARGS[@]}" --seeds "$seed" --methods "${SPECS[$i]}" --device "$DEVICE" \
                --threads 1 --workdir "$WORKDIR" --out "$OUTDIR/$name.json" \
                >"$OUTDIR/logs/$name.log" 2>&1 &
            names+=("$name")
            echo "started $name: ${SPECS[$i]}" >&2
        done
    done
done
wait
failed=()  # compare.py writes its --out only after a successful run
for name in "${names[@]}"; do
    if [[ ! -f $OUTDIR/$name.json ]]; then
        failed+=("$name")
        echo "FAILED $name; last lines of $OUTDIR/logs/$name.log:" >&2
        tail -n 5 "$OUTDIR/logs/$name.log" >&2
    fi
done

shopt -s nullglob
summary="{"
for task in "${TASKS[@]}"; do
    files=("$OUTDIR/$task"-*.json)
    [[ ${#files[@]} -gt 0 ]] || continue
    python bench/compare.py --table "${files[@]}" >"$OUTDIR/$task-table.md"
    head -n -1 "$OUTDIR/$task-table.md"
    echo
    summary+="\"$task\": $(tail -n 1 "$OUTDIR/$task-table.md"), "
done
echo "${#failed[@]} of ${#names[@]} runs failed: ${failed[*]:-none}" >&2
echo "$summary\"failed\": ${#failed[@]}}"
