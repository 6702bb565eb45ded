#!/usr/bin/env bash
# Fast-cWDM: train, sample and complete missing modalities. Presets are chosen by MODEL name.
#
#   bash run.sh                      no BraTS data under DATA_DIR: build the demo dataset, train the
#                                    demo preset on the CPU, sample the held-out cases, evaluate
#   bash run.sh --mode train --model unet --contr t2f --data_dir /data/BraTS2023/training
#   bash run.sh --mode sample --model fats --contr t2f --data_dir /data/BraTS2023/val_with_gt --steps 4
#   bash run.sh --mode auto --model fats --data_dir /data/BraSyn/pseudo_validation
#
# Environment variables give the defaults of the flags: MODEL, MODE, CONTR, DATA_DIR, STEPS, GPUS,
# RUN_DIR, OUT_DIR, CHECKPOINT.
set -euo pipefail
cd "$(dirname "$0")"

MODEL="${MODEL:-}"
MODE="${MODE:-}"
CONTR="${CONTR:-t2f}"
DATA_DIR="${DATA_DIR:-data/BraTS/training}"
STEPS="${STEPS:-}"
GPUS="${GPUS:-}"
RUN_DIR="${RUN_DIR:-}"
OUT_DIR="${OUT_DIR:-}"
CHECKPOINT="${CHECKPOINT:-}"
DEMO_DIR="${DEMO_DIR:-demo_data}"
DEMO_STEPS="${DEMO_STEPS:-}"
EXTRA=()

usage() {
    cat <<'TXT'
Usage: bash run.sh [--mode train|sample|auto] [--model unet|fast|fats|demo] [options] [-- extra script flags]

  --mode MODE        train (scripts/train.py), sample (scripts/sample.py: cases with ground truth,
                     writes NIfTI + metrics), auto (scripts/sample_auto.py: fill in the one missing
                     modality of each case). Default: train then sample; with no BraTS data under
                     --data_dir and no --model, the embedded CPU demo.
  --model NAME       MODEL preset: unet (cWDM: 64 ch, mult 1,2,2,4,4, linear 1000 steps),
                     fast (Fast-cWDM: same network, 10-step schedule), fats (per-band schedules,
                     learned 4-step sampling), demo (small network, reduced-size demo data, CPU).
  --contr MOD        target modality t1n|t1c|t2w|t2f, or all (train one model per modality). Default t2f.
  --data_dir DIR     BraTS-layout folder (<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz).
                     Default data/BraTS/training.
  --steps K          network evaluations per volume when sampling (0: the checkpoint's default).
  --gpus N           GPUs for training (torchrun when N > 1). Default: all visible; 0 = CPU.
  --run_dir DIR      training output (default runs/<model>); sample/auto read models from here.
  --out_dir DIR      sampling output (default results/<model>_<contr> or <data_dir>_completed).
  --checkpoint P     model for --mode sample (default <run_dir>/<contr>/best.pt); a path or hf://org/repo/file.
  -h, --help         this text.
Anything after -- is passed to the Python script unchanged (see python scripts/<script>.py --help).
TXT
}

while [ $# -gt 0 ]; do
    case "$1" in
        --mode) MODE="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --contr) CONTR="$2"; shift 2 ;;
        --data_dir) DATA_DIR="$2"; shift 2 ;;
        --steps) STEPS="$2"; shift 2 ;;
        --gpus) GPUS="$2"; shift 2 ;;
        --run_dir) RUN_DIR="$2"; shift 2 ;;
        --out_dir) OUT_DIR="$2"; shift 2 ;;
        --checkpoint) CHECKPOINT="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "run.sh: unknown option $1 (see bash run.sh --help)" >&2; exit 2 ;;
    esac
done

source scripts/ensure_env.sh

has_brats_data() {
    [ -d "$1" ] && find "$1" -mindepth 2 -maxdepth 2 -name '*-t1n.nii.gz' -print -quit 2>/dev/null | grep -q .
}

count_gpus() {
    if [ -n "$GPUS" ]; then echo "$GPUS"; return; fi
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

launch() {  # launch SCRIPT ARGS...: torchrun across GPUs when there are several
    local n; n=$(count_gpus)
    if [ "$n" -gt 1 ]; then
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$n" "$@"
    elif [ "$n" -eq 0 ]; then
        "$PYTHON" "$@" --cpu
    else
        "$PYTHON" "$@"
    fi
}

steps_flag() { if [ -n "$STEPS" ]; then echo "--steps $STEPS"; fi; }

run_demo() {
    local start=$SECONDS
    echo "[run.sh] no BraTS data under '$DATA_DIR': running the embedded demo on the CPU"
    echo "[run.sh] (put BraTS cases there, or pass --data_dir, to train on real data; see --help)"
    if ! has_brats_data "$DEMO_DIR/training"; then
        "$PYTHON" scripts/make_demo_data.py --out "$DEMO_DIR" --size 0.25 --n_train 16 --n_val 2 --n_pseudo 4 --seed 0
    else
        echo "[run.sh] reusing the demo dataset in $DEMO_DIR"
    fi
    local run_dir="${RUN_DIR:-runs/demo}" out_dir="${OUT_DIR:-results/demo_$CONTR}"
    local max_steps=()
    if [ -n "$DEMO_STEPS" ]; then max_steps=(--max_steps "$DEMO_STEPS"); fi
    "$PYTHON" scripts/train.py --preset demo --data_dir "$DEMO_DIR/training" --contr "$CONTR" \
        --run_dir "$run_dir" --resume auto --cpu "${max_steps[@]}" "${EXTRA[@]}"
    "$PYTHON" scripts/sample.py --checkpoint "$run_dir/$CONTR/best.pt" --data_dir "$DEMO_DIR/pseudo_validation_gt" \
        --contr "$CONTR" --out_dir "$out_dir" --device cpu --overwrite $(steps_flag)
    echo "[run.sh] demo finished in $((SECONDS - start)) s"
    echo "[run.sh] checkpoints:  $run_dir/$CONTR/{best,latest}.pt (+ .json configs, tensorboard/)"
    echo "[run.sh] syntheses:    $out_dir/<case>/<case>-$CONTR.nii.gz"
    echo "[run.sh] metrics:      $out_dir/metrics.json, $out_dir/metrics.csv"
    echo "[run.sh] figure:       $out_dir/slice.png"
}

if [ -z "$MODEL" ] && [ -z "$MODE" ] && ! has_brats_data "$DATA_DIR"; then
    run_demo
    exit 0
fi

MODEL="${MODEL:-unet}"
RUN_DIR="${RUN_DIR:-runs/$MODEL}"
if [ "$MODEL" = "demo" ] && ! has_brats_data "$DATA_DIR"; then
    run_demo
    exit 0
fi

do_train() {
    has_brats_data "$DATA_DIR" || { echo "run.sh: no BraTS cases under '$DATA_DIR'" >&2; exit 2; }
    launch scripts/train.py --preset "$MODEL" --data_dir "$DATA_DIR" --contr "$CONTR" --run_dir "$RUN_DIR" \
        --resume auto "${EXTRA[@]}"
}

do_sample() {
    local contrs=("$CONTR")
    if [ "$CONTR" = "all" ]; then contrs=(t1n t1c t2w t2f); fi
    for c in "${contrs[@]}"; do
        "$PYTHON" scripts/sample.py --checkpoint "${CHECKPOINT:-$RUN_DIR/$c/best.pt}" --data_dir "$DATA_DIR" \
            --contr "$c" --out_dir "${OUT_DIR:-results/${MODEL}_$c}" $(steps_flag) "${EXTRA[@]}"
    done
}

do_auto() {
    local out=()
    if [ -n "$OUT_DIR" ]; then out=(--out_dir "$OUT_DIR"); fi
    "$PYTHON" scripts/sample_auto.py --data_dir "$DATA_DIR" --model_dir "$RUN_DIR" "${out[@]}" $(steps_flag) "${EXTRA[@]}"
}

case "${MODE:-train_sample}" in
    train) do_train ;;
    sample) do_sample ;;
    auto) do_auto ;;
    train_sample) do_train; do_sample ;;
    *) echo "run.sh: unknown mode '$MODE' (train, sample or auto)" >&2; exit 2 ;;
esac
