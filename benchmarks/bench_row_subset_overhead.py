"""Where row_subset's training step spends the time the FLOP floor says it could save.

Three ResNet-50 variants take training steps (Adam) on one batch, interleaved, in a shuffled
order each round:
the plain network; row_subset mode (each branch gathers its k kept samples with
``index_select`` and adds them back with ``index_add``); and a reference that runs each
branch on a *slice* of the first k samples (a view: no gather, no scatter, a
``torch.cat`` back), the same work in FLOPs. If the two stochastic variants take the same
time, the gap between row_subset and its FLOP floor is not the gate's gathering but the
branch's layers running less efficiently on k < B samples.

Usage::

    python -m benchmarks.bench_row_subset_overhead [--batch-size 32] [--image 3x56] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from atomic_files import write_json_atomically
from benchmarks.bench_training_step import flop_floors, parse_image, time_steps
from resnet_with_stochastic_depth import ResNet, StochasticResNet, stochastic_depth_gates
from stochastic_depth.gate import subset_size


def _slice_forward(gate, branch, x, shortcut, first=None):
    """A row_subset gate that keeps the first k samples: the branch runs on a view of them."""
    k = subset_size(x.shape[0], gate.survival_prob)
    residual = branch(x[:k] if first is None else first(x[:k]))
    return torch.cat([shortcut[:k].add(residual, alpha=gate.survival_prob * x.shape[0] / k), shortcut[k:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image", type=parse_image, default=(3, 56, 56))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--p-last", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "row_subset_overhead.json")
    args = parser.parse_args()

    torch.set_num_threads(1)  # CPU time of one thread: what other jobs on the machine barely change
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, *args.image)
    y = torch.randint(10, (args.batch_size,))
    common = dict(in_channels=args.image[0], num_classes=10, p_last=args.p_last, mode="row_subset", seed=0)
    sliced = StochasticResNet.imagenet(50, **common)
    for gate in stochastic_depth_gates(sliced):
        gate.forward = _slice_forward.__get__(gate)
    variants = {
        "plain": ResNet.imagenet(50, in_channels=args.image[0], num_classes=10),
        "row_subset (index_select, index_add)": StochasticResNet.imagenet(50, **common),
        "branch on a slice of k samples (no gather or scatter)": sliced,
    }
    times = time_steps(variants, x, y, torch.device("cpu"), args.rounds, args.warmup, time.process_time)
    plain = statistics.median(times["plain"])
    floor = flop_floors(args.p_last, x, y)["row_subset"]["floor"]
    rows = {name: {"median_s": statistics.median(t), "ratio_to_plain": statistics.median(t) / plain, "samples_s": t}
            for name, t in times.items()}
    print(f"ResNet-50 training step, batch {args.batch_size}x{'x'.join(map(str, args.image))}, "
          f"p_L {args.p_last}, CPU time of 1 thread, median of {args.rounds}, torch {torch.__version__}")
    for name, row in rows.items():
        print(f"{name:55s} {1e3 * row['median_s']:8.1f} ms {row['ratio_to_plain']:6.3f}")
    print(f"{'FLOP floor of row_subset':55s} {'':11s} {floor:6.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.out, {"batch_size": args.batch_size, "image": list(args.image), "p_last": args.p_last,
                                    "rounds": args.rounds, "torch": torch.__version__, "threads": 1,
                                    "clock": "process", "flop_floor": floor, "results": rows}, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
