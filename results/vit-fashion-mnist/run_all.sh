#!/usr/bin/env bash
# Issue 32's transformer cell of the schedule map: does stochastic depth help a small ViT, and with which schedule?
# The data and run length of the ResNet map (results/schedules-fashion-mnist/run_all.sh): Fashion-MNIST at 16x16
# pixels, 5,504 training images (a random subset; 5,000 held out to validate), 48 epochs of 43 steps (2,064 optimizer
# steps of 128 images), validation and test error every 12 epochs and at the end. SIZE=55000 runs the regime map's
# other size instead (results/regime-fashion-mnist): all 55,000 training images, 5 epochs of 430 steps (2,150 steps),
# evaluated after each epoch.
# The network: timm's VisionTransformer, 12 blocks of width 64, 2 heads, MLPs of 256, 4x4 patches (16 tokens and a
# class token), 602,826 parameters. The ViT recipe (DeiT's, shortened): AdamW, lr 1e-3, weight decay 0.05 (none on
# biases, norms, position embedding, class token), a linear warm-up from 1e-6 over the first 200 steps, cosine decay
# to 0 over the run. No augmentation, unlike the ResNet map: train.py's shifts of up to 4 pixels (a quarter of a
# 16-pixel image) kept the ViT from fitting in 2,064 steps (pilot: 24.3% training error, 23.7% test error at the end).
# Arms: plain (no drops, no gates); sd (timm's rule: drop probability rising linearly from 0 at the first block to
# 0.1 at the last, DeiT-Tiny's, per sample, dropped samples not computed: row_subset); early (those drops for the
# first 25% of the steps, then none); late (none for the first 25%, then those drops): the switch of the ResNet map.
# Seeds 0-4, paired: the arms of a seed start from the same weights and see the same batches.
# The cell folder d12-n5504 (d12-n55000) is named as regime_study.cells() reads a cell (d{blocks}-n{training
# images}), so that `regime_study.py schedules --root results/vit-fashion-mnist` can make the map. Unlike the ResNet
# map, no `regime_study.py evaluate` after each run: it re-estimates BatchNorm statistics, and a ViT has none.
# One run at a time, one thread (the machine is shared); seed by seed, so that whole paired seeds land first (the
# first run, plain-seed0, shows within minutes whether the recipe trains: STOP, below, stops the rest).
# The pilot (sd arm, seed 0, one thread, 2-core machine under load): 0.18 s of training per step, 6.8 minutes a run.
# Resumable: run it again; a finished run (metrics.json with all its epochs) is skipped, a cut one resumed from its
# checkpoint.pt (written every epoch). SEEDS and ARMS choose a part, e.g. ARMS="plain sd" SEEDS="0 1".
# CODE=DIR runs train.py from DIR (a snapshot of the code, e.g. `git archive HEAD | tar -x -C DIR`), so that the runs
# do not pick up code being edited in this checkout; the log names the snapshot's commit (DIR/COMMIT) or this one's.
# A file STOP in this folder stops the script before its next run (delete it to go on).
#
#   nohup results/vit-fashion-mnist/run_all.sh >> results/vit-fashion-mnist/run_all.log 2>&1 &
set -u
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PYTHON=${PYTHON:-.venv/bin/python}
CODE=${CODE:-.}
COMMIT=$(cat "$CODE/COMMIT" 2>/dev/null || git rev-parse --short HEAD)
TORCH=$("$PYTHON" -c 'import torch, timm; print(f"{torch.__version__}, timm {timm.__version__}")')
OUT=$PWD/results/vit-fashion-mnist
SIZE=${SIZE:-5504}
SEEDS=${SEEDS:-"0 1 2 3 4"}
ARMS=${ARMS:-"plain sd early late"}
case $SIZE in
  5504) sizing="--train-subset 5504 --epochs 48 --eval-every 12" ;;
  55000) sizing="--epochs 5 --eval-every 1" ;;
  *) echo "SIZE is 5504 or 55000, got $SIZE"; exit 2 ;;
esac
RECIPE="--dataset fashion-mnist --image-size 16 --augmentation none $sizing --schedule-unit step
  --model vit --vit-layers 12 --vit-width 64 --vit-heads 2 --vit-patch 4
  --optimizer adamw --lr 1e-3 --weight-decay 0.05 --lr-schedule cosine
  --warmup-steps 200 --warmup-lr 1e-6 --warmup-shape linear --no-progress"
finished() {
  [ -f "$1/metrics.json" ] && "$PYTHON" -c "import json,sys; d=json.load(open('$1/metrics.json')); sys.exit(d['summary']['epochs_done'] != d['config']['epochs'])"
}
for item in $(for s in $SEEDS; do for a in $ARMS; do echo "$a:$s"; done; done); do
  arm=${item%%:*}; seed=${item##*:}
  dir=$OUT/d12-n$SIZE/$arm-seed$seed
  finished "$dir" && continue
  [ -f "$OUT/STOP" ] && { echo "$(date -u +%FT%TZ) $OUT/STOP found: stopping before $dir"; exit 0; }
  case $arm in
    plain) armopt="--plain" ;;
    sd) armopt="--drop-path-rate 0.1" ;;
    early|late) armopt="--drop-path-rate 0.1 --drop-schedule $arm --drop-switch 0.25" ;;
    *) echo "unknown arm $arm (plain, sd, early, late)"; exit 2 ;;
  esac
  resume=""; [ -f "$dir/checkpoint.pt" ] && resume="--resume"
  echo "$(date -u +%FT%TZ) start $dir ${resume:+(resumed) }with code $COMMIT, torch $TORCH, on $(hostname), $(nproc --all) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
  start=$(date +%s)
  "$PYTHON" "$CODE/train.py" $RECIPE $armopt --seed "$seed" --output-dir "$dir" $resume
  rc=$?
  echo "$(date -u +%FT%TZ) end $dir rc=$rc wall $(( $(date +%s) - start )) s on $(hostname)"
done
echo "$(date -u +%FT%TZ) all asked runs done"
