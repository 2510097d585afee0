#!/usr/bin/env bash
# The regime study: train.py's recipe on Fashion-MNIST at 16x16 pixels, plain vs stochastic depth
# (linear, p_L = 0.5), ResNet-20/56/110 (option A), 5,504 or 55,000 training images, seeds 0-2.
# Every run takes 430 optimizer steps of 128 images (10 epochs of 5,504 images, 1 epoch of 55,000),
# lr from 0.01 rising linearly to 0.1 over the first 129 steps (a constant 0.01 for 43 or 129 steps
# did not keep a plain ResNet-56 from diverging at the jump to 0.1), divided by 10 after 50% and 75% of the steps.
# One run at a time, one thread each; seed by seed, so that whole cells land first.
# Resumable: run it again; finished runs are skipped, interrupted ones resumed from their checkpoint.
#
#   nohup results/regime-fashion-mnist/run_all.sh > results/regime-fashion-mnist/run_all.log 2>&1 &
set -u
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PYTHON=${PYTHON:-.venv/bin/python}
OUT=results/regime-fashion-mnist
SEEDS=${SEEDS:-"0 1 2"}
for seed in $SEEDS; do
  for size in 5504 55000; do
    for depth in 20 56 110; do
      for model in plain sd; do
        dir=$OUT/d$depth-n$size/$model-seed$seed
        if [ "$size" = 5504 ]; then sizing="--train-subset 5504 --epochs 10 --eval-every 5"; else sizing="--epochs 1"; fi
        if [ "$model" = plain ]; then modelopt="--plain"; else modelopt="--p-last 0.5 --survival-rule linear"; fi
        if [ -f "$dir/metrics.json" ] && "$PYTHON" -c "import json,sys; d=json.load(open('$dir/metrics.json')); sys.exit(d['summary']['epochs_done'] != d['config']['epochs'])"; then
          continue
        fi
        resume=""; [ -f "$dir/checkpoint.pt" ] && resume="--resume"
        echo "$(date -u +%FT%TZ) start $dir on $(hostname) ($(nproc --all) cores)"
        start=$(date +%s)
        "$PYTHON" train.py --dataset fashion-mnist --image-size 16 --depth "$depth" $modelopt $sizing \
          --schedule-unit step --warmup-steps 129 --warmup-lr 0.01 --warmup-shape linear --seed "$seed" --output-dir "$dir" --no-progress $resume
        echo "$(date -u +%FT%TZ) end $dir rc=$? wall $(( $(date +%s) - start )) s"
      done
    done
  done
  # Evaluate this seed's runs again from their checkpoints (BatchNorm re-estimated; the depth curve).
  echo "$(date -u +%FT%TZ) evaluate seed $seed"
  start=$(date +%s)
  "$PYTHON" regime_study.py evaluate --seed "$seed" --root "$OUT"
  echo "$(date -u +%FT%TZ) evaluated seed $seed rc=$? wall $(( $(date +%s) - start )) s"
done
echo "$(date -u +%FT%TZ) all done"
