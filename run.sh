#!/usr/bin/env bash
# Fast-cWDM: train, sample and complete missing modalities. run.sh only chooses a preset by name.
#
#   bash run.sh                      no BraTS data under DATA_DIR: build the demo dataset, train the
#                                    demo preset on the CPU, sample the held-out cases, evaluate
#   bash run.sh --mode train --preset unet --target t2f --data_dir /data/BraTS2023/training
#   bash run.sh --mode sample --preset fats --target t2f --data_dir /data/BraTS2023/val_with_gt --nfe 4
#   bash run.sh --mode auto --preset fats --data_dir /data/BraSyn/pseudo_validation
#
# Environment variables give the defaults of the flags: PRESET, MODE, TARGET, DATA_DIR, NFE, GPUS,
# RUN_DIR, OUT_DIR, CHECKPOINT, NUM_SAMPLES. The old spellings (--model / MODEL, --contr / CONTR, --steps / STEPS)
# still work and print a note.
set -euo pipefail
cd "$(dirname "$0")"

note_renamed() { echo "[run.sh] note: $1 is deprecated, use $2 (same meaning)" >&2; }

# Old environment variable names: used when the new one is not set.
if [ -n "${MODEL:-}" ]; then note_renamed "MODEL=" "PRESET="; PRESET="${PRESET:-$MODEL}"; fi
if [ -n "${CONTR:-}" ]; then note_renamed "CONTR=" "TARGET="; TARGET="${TARGET:-$CONTR}"; fi
if [ -n "${STEPS:-}" ]; then note_renamed "STEPS=" "NFE="; NFE="${NFE:-$STEPS}"; fi

PRESET="${PRESET:-}"
MODE="${MODE:-}"
TARGET="${TARGET:-t2f}"
DATA_DIR="${DATA_DIR:-}"  # empty: found below (data/BraTS/training or cWDM's data/BRATS/training)
NFE="${NFE:-}"
GPUS="${GPUS:-}"
RUN_DIR="${RUN_DIR:-}"
OUT_DIR="${OUT_DIR:-}"
CHECKPOINT="${CHECKPOINT:-}"
NUM_SAMPLES="${NUM_SAMPLES:-}"  # empty: one sample per case (the scripts' default)
DEMO_DIR="${DEMO_DIR:-demo_data}"
DEMO_STEPS="${DEMO_STEPS:-}"
EXTRA=()
SAMPLE_FLAGS=()
VAL_DIR="${VAL_DIR:-}"

usage() {
    cat <<'TXT'
Usage: bash run.sh [--mode train|sample|auto] [--preset unet|fast|fats|demo] [options] [-- extra script flags]

  --mode MODE        train (scripts/train.py), sample (scripts/sample.py: cases with ground truth,
                     writes NIfTI + metrics), auto (scripts/sample_auto.py: fill in the one missing
                     modality of each case). Default: train then sample; with no BraTS data under
                     --data_dir and no --preset, the embedded CPU demo.
  --preset NAME      unet (cWDM: 64 ch, mult 1,2,2,4,4, linear 1000 steps),
                     fast (Fast-cWDM: same network, 10-step schedule), fats (per-band schedules,
                     learned 4-step sampling), demo (small network, reduced-size demo data, CPU);
                     fats_all, demo_all: ONE model for all four modalities (docs/all_modality.md);
                     wfm, wfm_noisy, demo_wfm, demo_wfm_noisy: flow matching from the mean of the
                     conditions, 1-2 Euler steps (docs/flow_matching.md). A demo_* preset without
                     BraTS data runs on the demo dataset.
                     (old spelling: --model)
  --target MOD       modality to synthesise: t1n|t1c|t2w|t2f, or all (train one model per
                     modality; with a *_all preset its one model, which needs --target all).
                     Default t2f. (old spelling: --contr)
  --data_dir DIR     BraTS-layout folder (<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz).
                     Default: data/BraTS/training, or cWDM's data/BRATS/training when only that
                     one holds cases (the folder used is printed).
  --nfe K            network evaluations per volume when sampling (0: the checkpoint's default).
                     (old spelling: --steps)
  --gpus N           GPUs for training and sampling (torchrun when N > 1: sample/auto split the cases
                     over the GPUs, one merged report). Default: all visible; 0 = CPU.
  --threads N        CPU threads of every step (exports OMP_NUM_THREADS=N; default: that variable, else
                     one per core). On a shared machine fewer threads can be several times faster.
  --run_dir DIR      training output (default runs/<preset>); sample/auto read models from here.
  --out_dir DIR      sampling output (default results/<preset>_<target> or <data_dir>_completed).
  --checkpoint P     model for --mode sample (default <run_dir>/<target>/best.pt, <run_dir>/all/best.pt
                     for a *_all preset); a path or hf://org/repo/file.
  --val_dir DIR      validation cases (all four modalities) for training; the default mode then scores
                     the model on them. Without it, training holds out a few cases of --data_dir and
                     the default mode scores the model on those (never on its training cases).
  --num_samples M    samples per case in modes sample and auto (default 1): M > 1 writes their mean
                     as the synthesis and a per-voxel std map <case>-<mod>_std.nii.gz, and sample
                     adds ensemble metrics (CRPS, spread/error, calibration); docs/uncertainty.md.
  --sample_flags "F" flags for the sampling step (e.g. "--sampler ddim --nfe 10"), in every mode.
  -h, --help         this text.
Anything after -- is passed to the Python script of the mode unchanged (train.py in the default
mode; see python scripts/<script>.py --help).
TXT
}

while [ $# -gt 0 ]; do
    case "$1" in  # every option below but -h/--help and -- takes a value: refuse a missing one by name
        --mode|--preset|--model|--target|--contr|--data_dir|--nfe|--steps|--gpus|--run_dir|--out_dir|--checkpoint|--num_samples)
            if [ $# -lt 2 ] || [ -z "$2" ] || [ "${2#--}" != "$2" ]; then
                echo "run.sh: $1 needs a value (see bash run.sh --help)" >&2; exit 2
            fi ;;
    esac
    case "$1" in
        --mode) MODE="$2"; shift 2 ;;
        --preset) PRESET="$2"; shift 2 ;;
        --model) note_renamed --model --preset; PRESET="$2"; shift 2 ;;
        --target) TARGET="$2"; shift 2 ;;
        --contr) note_renamed --contr --target; TARGET="$2"; shift 2 ;;
        --data_dir) DATA_DIR="$2"; shift 2 ;;
        --nfe) NFE="$2"; shift 2 ;;
        --steps) note_renamed --steps --nfe; NFE="$2"; shift 2 ;;
        --gpus) GPUS="$2"; shift 2 ;;
        --threads) export OMP_NUM_THREADS="$2"; shift 2 ;;
        --val_dir) VAL_DIR="$2"; shift 2 ;;
        --sample_flags) read -r -a SAMPLE_FLAGS <<< "$2"; shift 2 ;;
        --run_dir) RUN_DIR="$2"; shift 2 ;;
        --out_dir) OUT_DIR="$2"; shift 2 ;;
        --checkpoint) CHECKPOINT="$2"; shift 2 ;;
        --num_samples) NUM_SAMPLES="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "run.sh: unknown option $1 (see bash run.sh --help)" >&2; exit 2 ;;
    esac
done

if [ -n "$NUM_SAMPLES" ]; then SAMPLE_FLAGS+=(--num_samples "$NUM_SAMPLES"); fi  # checked by the scripts

source scripts/ensure_env.sh

has_brats_data() {
    [ -d "$1" ] && find "$1" -mindepth 2 -maxdepth 2 -name '*-t1n.nii.gz' -print -quit 2>/dev/null | grep -q .
}

if [ -z "$DATA_DIR" ]; then  # this project's layout, then the one cWDM's README documents
    DATA_DIR=data/BraTS/training
    for candidate in data/BraTS/training data/BRATS/training; do
        if has_brats_data "$candidate"; then DATA_DIR=$candidate; echo "[run.sh] data: $DATA_DIR"; break; fi
    done
fi

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

sample_launch() {  # sample_launch SCRIPT ARGS...: one process per GPU (torchrun) when there are several
    local n; n=$(count_gpus)
    if [ "$n" -gt 1 ]; then
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$n" "$@"
    elif [ "$GPUS" = "0" ]; then
        "$PYTHON" "$@" --device cpu
    else
        "$PYTHON" "$@"
    fi
}

nfe_flag() { if [ -n "$NFE" ]; then echo "--nfe $NFE"; fi; }

ensure_demo_data() {
    if ! has_brats_data "$DEMO_DIR/training"; then
        "$PYTHON" scripts/make_demo_data.py --out "$DEMO_DIR" --size 0.25 --n_train 16 --n_val 2 --n_pseudo 4 --seed 0
    else
        echo "[run.sh] reusing the demo dataset in $DEMO_DIR"
    fi
}

run_demo() {
    local start=$SECONDS
    echo "[run.sh] no BraTS data under '$DATA_DIR': running the embedded demo on the CPU"
    echo "[run.sh] (put BraTS cases there, or pass --data_dir, to train on real data; see --help)"
    ensure_demo_data
    local run_dir="${RUN_DIR:-runs/demo}" out_dir="${OUT_DIR:-results/demo_$TARGET}"
    local max_steps=()
    if [ -n "$DEMO_STEPS" ]; then max_steps=(--max_steps "$DEMO_STEPS"); fi
    "$PYTHON" scripts/train.py --preset demo --data_dir "$DEMO_DIR/training" --target "$TARGET" \
        --run_dir "$run_dir" --resume auto --cpu "${max_steps[@]}" "${EXTRA[@]}"
    # Tumour Dice / HD95 (docs/segmentation.md): with a demo segmenter when there is one; DEMO_SEGMENTER=1 trains
    # it first (opt-in: 2-5 min of CPU time, 7+ min wall on a busy machine), DEMO_SEGMENTER=0 never uses it.
    local segmenter=() seg_ckpt="$run_dir/segmenter/segmenter.pt" seg_mode="${DEMO_SEGMENTER:-}"
    if [ "$seg_mode" = 0 ]; then
        :
    elif { [ "$seg_mode" = 1 ] || [ -f "$seg_ckpt" ]; } && ! "$PYTHON" -c 'import monai' 2>/dev/null; then
        echo "[run.sh] no Dice / HD95: the demo segmenter needs MONAI (pip install -e '.[seg]')"
    elif [ -f "$seg_ckpt" ]; then
        echo "[run.sh] tumour Dice / HD95 with the demo segmenter $seg_ckpt"; segmenter=(--segmenter "$seg_ckpt")
    elif [ "$seg_mode" = 1 ]; then
        "$PYTHON" scripts/train_segmenter.py --preset demo --data_dir "$DEMO_DIR/training" --out "$seg_ckpt" --device cpu
        segmenter=(--segmenter "$seg_ckpt")
    else
        echo "[run.sh] DEMO_SEGMENTER=1 bash run.sh also reports tumour Dice / HD95 (trains a segmenter once)"
    fi
    "$PYTHON" scripts/sample.py --checkpoint "$run_dir/$TARGET/best.pt" --data_dir "$DEMO_DIR/pseudo_validation_gt" \
        --target "$TARGET" --out_dir "$out_dir" --device cpu --overwrite $(nfe_flag) "${segmenter[@]}"
    echo "[run.sh] demo finished in $((SECONDS - start)) s"
    echo "[run.sh] checkpoints:  $run_dir/$TARGET/{best,latest}.pt (+ .json configs, tensorboard/)"
    echo "[run.sh] syntheses:    $out_dir/<case>/<case>-$TARGET.nii.gz"
    echo "[run.sh] metrics:      $out_dir/metrics.json, $out_dir/metrics.csv"
    echo "[run.sh] figure:       $out_dir/slice.png"
}

if [ -z "$PRESET" ] && [ -z "$MODE" ] && ! has_brats_data "$DATA_DIR"; then
    run_demo
    exit 0
fi

PRESET="${PRESET:-unet}"
RUN_DIR="${RUN_DIR:-runs/$PRESET}"
is_all_preset() { case "$PRESET" in *_all) return 0 ;; *) return 1 ;; esac; }  # one model, <run_dir>/all
model_folder() { if is_all_preset; then echo "$RUN_DIR/all"; else echo "$RUN_DIR/$1"; fi; }  # model_folder MOD
# every demo_* preset (demo_all, demo_fats, demo_wfm ...) runs on the demo dataset when there is no BraTS data
is_demo_preset() { case "$PRESET" in demo | demo_*) return 0 ;; *) return 1 ;; esac; }
if is_demo_preset && ! has_brats_data "$DATA_DIR"; then
    case "${MODE:-train_sample}" in  # the demo dataset, for the mode asked for
        train_sample)
            if [ "$PRESET" = "demo" ]; then run_demo; exit 0; fi
            ensure_demo_data; DATA_DIR="$DEMO_DIR/training" ;;  # demo_*: trained, scored on held-out cases
        train) ensure_demo_data; DATA_DIR="$DEMO_DIR/training" ;;
        sample) ensure_demo_data; DATA_DIR="$DEMO_DIR/pseudo_validation_gt" ;;
        auto) ensure_demo_data; DATA_DIR="$DEMO_DIR/pseudo_validation" ;;
    esac
    echo "[run.sh] demo preset, no BraTS data: --mode $MODE on the demo dataset $DATA_DIR (models: $RUN_DIR)"
fi

do_train() {
    has_brats_data "$DATA_DIR" || { echo "run.sh: no BraTS cases under '$DATA_DIR'" >&2; exit 2; }
    local val=()
    if [ -n "$VAL_DIR" ]; then val=(--val_dir "$VAL_DIR"); fi
    launch scripts/train.py --preset "$PRESET" --data_dir "$DATA_DIR" --target "$TARGET" --run_dir "$RUN_DIR" \
        --resume auto "${val[@]}" "${EXTRA[@]}"
}

sample_out_dir() {  # sample_out_dir MOD: --out_dir, with one sub-folder per modality for --target all
    if [ -z "$OUT_DIR" ]; then echo "results/${PRESET}_$1"
    elif [ "$TARGET" = "all" ]; then echo "$OUT_DIR/$1"
    else echo "$OUT_DIR"; fi
}

do_sample() {  # do_sample [after_training]: after training, score on held-out cases only, with --sample_flags
    local targets=("$TARGET")
    if [ "$TARGET" = "all" ]; then targets=(t1n t1c t2w t2f); fi
    for t in "${targets[@]}"; do
        local data=(--data_dir "$DATA_DIR") flags=("${EXTRA[@]}")
        if [ "${1:-}" = after_training ]; then
            flags=()
            if [ -n "$VAL_DIR" ]; then
                data=(--data_dir "$VAL_DIR"); echo "[run.sh] scoring $t on the validation folder $VAL_DIR"
            else
                data+=(--held_out_of "$(model_folder "$t")/run_config.json")
                echo "[run.sh] scoring $t on the cases training held out of $DATA_DIR ($(model_folder "$t")/run_config.json)"
            fi
        fi
        sample_launch scripts/sample.py --checkpoint "${CHECKPOINT:-$(model_folder "$t")/best.pt}" "${data[@]}" \
            --target "$t" --out_dir "$(sample_out_dir "$t")" $(nfe_flag) "${flags[@]}" "${SAMPLE_FLAGS[@]}"
    done
}

do_auto() {
    local out=()
    if [ -n "$OUT_DIR" ]; then out=(--out_dir "$OUT_DIR"); fi
    sample_launch scripts/sample_auto.py --data_dir "$DATA_DIR" --model_dir "$RUN_DIR" "${out[@]}" $(nfe_flag) \
        "${EXTRA[@]}" "${SAMPLE_FLAGS[@]}"
}

case "${MODE:-train_sample}" in
    train) do_train ;;
    sample) do_sample ;;
    auto) do_auto ;;
    train_sample) do_train; do_sample after_training ;;
    *) echo "run.sh: unknown mode '$MODE' (train, sample or auto)" >&2; exit 2 ;;
esac
