#!/usr/bin/env bash
# Issue 22's map: where stochastic depth helps, and with which drop schedule.
# train.py's recipe on Fashion-MNIST at 16x16 pixels, 5,504 training images, ResNet-20 and ResNet-56 (option A),
# arms: plain; sd (linear rule, p_L = 0.5, drops throughout); early (drops for the first 25% of the steps, then
# none); late (none for the first 25%, then drops); seeds 0-4, paired: the arms of a seed start from the same weights
# and see the same batches. Every run: 48 epochs of 43 steps (2,064 optimizer steps of 128 images), lr 0.1 reached by
# a linear warm-up from 0.01 over the first 200 steps, divided by 10 after 50% and 75% of the steps; validation and
# test error every 12 epochs (at the end of each lr phase
# but the first, and at the end). After each run, `regime_study.py evaluate` evaluates the finished runs again from
# their checkpoints (evaluation.json; depth_curve.json for ResNet-56); `regime_study.py schedules` makes the map.
# One run at a time, one thread (the machine is shared); the ResNet-20 cell first, then ResNet-56; seed by seed, so
# that whole paired seeds land first.
# Resumable: run it again; a finished run (metrics.json with all 48 epochs) is skipped, a cut one resumed from its
# checkpoint.pt (written every epoch). DEPTHS, SEEDS and ARMS choose a part, e.g. ARMS="plain sd" DEPTHS=20.
# CODE=DIR runs train.py from DIR (a snapshot of the code, e.g. `git archive HEAD | tar -x -C DIR`), so that the runs
# do not pick up code being edited in this checkout; the log names the snapshot's commit (DIR/COMMIT) or this one's.
# A file STOP in this folder stops the script before its next run (delete it to go on).
#
#   nohup results/schedules-fashion-mnist/run_all.sh >> results/schedules-fashion-mnist/run_all.log 2>&1 &
set -u
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PYTHON=${PYTHON:-.venv/bin/python}
CODE=${CODE:-.}
COMMIT=$(cat "$CODE/COMMIT" 2>/dev/null || git rev-parse --short HEAD)
TORCH=$("$PYTHON" -c 'import torch; print(torch.__version__)')
OUT=$PWD/results/schedules-fashion-mnist
DEPTHS=${DEPTHS:-"20 56"}
SEEDS=${SEEDS:-"0 1 2 3 4"}
ARMS=${ARMS:-"plain sd early late"}
RECIPE="--dataset fashion-mnist --image-size 16 --train-subset 5504 --epochs 48 --eval-every 12 --lr 0.1
  --schedule-unit step --warmup-steps 200 --warmup-lr 0.01 --warmup-shape linear --no-progress"
finished() {
  [ -f "$1/metrics.json" ] && "$PYTHON" -c "import json,sys; d=json.load(open('$1/metrics.json')); sys.exit(d['summary']['epochs_done'] != d['config']['epochs'])"
}
for depth in $DEPTHS; do
  for item in $(for s in $SEEDS; do for a in $ARMS; do echo "$a:$s"; done; done); do
    arm=${item%%:*}; seed=${item##*:}
    dir=$OUT/d$depth-n5504/$arm-seed$seed
    finished "$dir" && continue
    [ -f "$OUT/STOP" ] && { echo "$(date -u +%FT%TZ) $OUT/STOP found: stopping before $dir"; exit 0; }
    case $arm in
      plain) armopt="--plain" ;;
      sd) armopt="--p-last 0.5 --survival-rule linear" ;;
      early|late) armopt="--p-last 0.5 --survival-rule linear --drop-schedule $arm --drop-switch 0.25" ;;
    esac
    resume=""; [ -f "$dir/checkpoint.pt" ] && resume="--resume"
    echo "$(date -u +%FT%TZ) start $dir ${resume:+(resumed) }with code $COMMIT, torch $TORCH, on $(hostname), $(nproc --all) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
    start=$(date +%s)
    "$PYTHON" "$CODE/train.py" $RECIPE --depth "$depth" $armopt --seed "$seed" --output-dir "$dir" $resume
    rc=$?
    echo "$(date -u +%FT%TZ) end $dir rc=$rc wall $(( $(date +%s) - start )) s"
    # Evaluate every finished run that has no evaluation.json yet from its checkpoint (regime_study.evaluate_run:
    # the evaluation network's training error, BatchNorm re-estimated; the depth curve for ResNet-56).
    start=$(date +%s)
    "$PYTHON" "$CODE/regime_study.py" evaluate --root "$OUT" --curve-depth 56 --curve-size 5504 --curve-seeds $SEEDS
    echo "$(date -u +%FT%TZ) evaluated rc=$? wall $(( $(date +%s) - start )) s"
  done
done
echo "$(date -u +%FT%TZ) all asked runs done"
