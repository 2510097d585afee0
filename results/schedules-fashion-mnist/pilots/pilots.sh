#!/usr/bin/env bash
# Issue 22 recipe pilots: plain ResNet-56, seed 2 (the seed that failed in the old map), 5,504 images at 16x16,
# the first 387 steps (9 epochs) of a 48-epoch (2,064-step) schedule; lr 0.1 vs 0.05, linear warm-up over 200 steps.
set -u
cd /work/wt-study
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
P=/work/main/.venv/bin/python
common="--dataset fashion-mnist --image-size 16 --depth 56 --plain --train-subset 5504 --epochs 48 --eval-every 8 --schedule-unit step --warmup-shape linear --seed 2 --no-progress --max-steps 387"
for lr in 0.1 0.05; do
  s=$(date +%s)
  $P train.py $common --lr $lr --warmup-lr $(python3 -c "print($lr/10)") --warmup-steps 200 --output-dir /tmp/study-pilot/d56-plain-s2-lr$lr
  echo "lr $lr wall $(( $(date +%s) - s )) s"
done
