"""Time this gate against an older checkout's, interleaved in one run: did a change cost speed?

ResNet-50 training steps (forward, cross-entropy, backward, Adam) of the plain network and
of StochasticResNet in batch and row_subset mode, built from this checkout's
``resnet_with_stochastic_depth.py`` and from another copy of that file (e.g. a worktree of an
earlier commit: ``git worktree add /tmp/previous <commit>``), all interleaved in a shuffled
order each round, in CPU time of one thread. With ``--p-last 1`` every block runs, so the
ratios differ only by what the gates' machinery costs; at lower p_L the block-mode ratio also
depends on which blocks the timed steps dropped (the mean number of active blocks is printed).

Usage::

    python -m benchmarks.bench_gate_versions --previous /tmp/previous/resnet_with_stochastic_depth.py \
        [--batch-size 128] [--image 1x28] [--rounds 12] [--p-last 1.0]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

import resnet_with_stochastic_depth as current
from atomic_files import write_json_atomically
from benchmarks.bench_training_step import parse_image, time_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--previous", type=Path, required=True, help="another resnet_with_stochastic_depth.py")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image", type=parse_image, default=(1, 28, 28))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--p-last", type=float, default=1.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not args.previous.is_file():
        parser.error(f"--previous {args.previous}: no such file")
    spec = importlib.util.spec_from_file_location("previous_resnet_with_stochastic_depth", args.previous)
    previous = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(previous)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, *args.image)
    y = torch.randint(10, (args.batch_size,))
    common = dict(in_channels=args.image[0], num_classes=10, p_last=args.p_last, seed=0)
    variants = {"plain": current.ResNet.imagenet(50, in_channels=args.image[0], num_classes=10)}
    for label, module in (("previous", previous), ("current", current)):
        for mode in ("batch", "row_subset"):
            variants[f"{label} {mode}"] = module.StochasticResNet.imagenet(50, mode=mode, **common)
    active: dict[str, list[int]] = {name: [] for name in variants}

    def count_active_blocks(name, model):
        if name.endswith("batch"):
            active[name].append(int(model.active_blocks.sum()))

    times = time_steps(variants, x, y, torch.device("cpu"), args.rounds, args.warmup, time.process_time, count_active_blocks)
    plain = statistics.median(times["plain"])
    rows = {name: {"median_s": statistics.median(t), "ratio_to_plain": statistics.median(t) / plain,
                   "mean_active_blocks": statistics.mean(active[name]) if active[name] else None, "samples_s": t}
            for name, t in times.items()}
    print(f"ResNet-50 training step, batch {args.batch_size}x{'x'.join(map(str, args.image))}, p_L {args.p_last}, "
          f"CPU time of 1 thread, median of {args.rounds}, torch {torch.__version__}")
    for name, row in rows.items():
        blocks = "" if row["mean_active_blocks"] is None else f"   mean active blocks {row['mean_active_blocks']:.2f}"
        print(f"{name:22s} {1e3 * row['median_s']:8.1f} ms {row['ratio_to_plain']:6.3f}{blocks}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.out, {"previous": str(args.previous), "batch_size": args.batch_size,
                                    "image": list(args.image), "p_last": args.p_last, "rounds": args.rounds,
                                    "torch": torch.__version__, "threads": 1, "clock": "process",
                                    "results": rows}, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
