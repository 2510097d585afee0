"""Time one training step of ResNet-50 with and without stochastic depth, beside the peers.

Every variant trains on the same MNIST-sized batch (1x28x28, batch 128 by default):
forward, cross-entropy, backward and an Adam step. The variants run interleaved, in a
shuffled order each round, and the table reports the median step after warm-up, as a
ratio to the plain ResNet measured in the same run.

Beside the block-mode ratio it prints its floor: the fraction of the plain step's
work that stochastic depth still does on average, (fixed + sum p_l work_l) /
(fixed + sum work_l), with each block's work counted in FLOPs (forward and
backward) by ``torch.utils.flop_counter``.

Usage::

    python benchmarks/bench_training_step.py [--device cpu] [--batch-size 128] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet_with_stochastic_depth import (  # noqa: E402
    ResNet,
    StochasticResNet,
    survival_probabilities,
    training_flop_floor,
)


class TorchvisionMask(nn.Module):
    """The gate a user gets from ``torchvision.ops.stochastic_depth``: the branch always runs."""

    def __init__(self, survival_prob: float, mode: str) -> None:
        super().__init__()
        self.survival_prob, self.mode = survival_prob, mode

    def forward(self, branch, x, shortcut):
        residual = torchvision.ops.stochastic_depth(branch(x), 1 - self.survival_prob, self.mode, self.training)
        return shortcut + residual


def resnet50_masked_by_torchvision(mode: str, p_last: float) -> ResNet:
    model = ResNet.imagenet(50, in_channels=1, num_classes=10)
    for block, p in zip(model.blocks, survival_probabilities(len(model.blocks), "linear", p_last)):
        block.stochastic_depth = TorchvisionMask(p, mode)
    return model


def build_variants(p_last: float) -> dict[str, nn.Module]:
    import timm

    common = dict(in_channels=1, num_classes=10)
    return {
        "ResNet-50 (plain)": ResNet.imagenet(50, **common),
        "StochasticResNet, batch mode": StochasticResNet.imagenet(50, p_last=p_last, seed=0, **common),
        "StochasticResNet, row mode": StochasticResNet.imagenet(50, p_last=p_last, mode="row", seed=0, **common),
        "torchvision.ops.stochastic_depth, batch": resnet50_masked_by_torchvision("batch", p_last),
        "torchvision.ops.stochastic_depth, row": resnet50_masked_by_torchvision("row", p_last),
        f"timm resnet50, drop_path_rate={p_last}": timm.create_model(
            "resnet50", in_chans=1, num_classes=10, drop_path_rate=1 - p_last
        ),
    }


def flop_floor(p_last: float, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Expected fraction of a plain training step's FLOPs that block mode still computes."""
    model = ResNet.imagenet(50, in_channels=1, num_classes=10)
    return training_flop_floor(model, x, y, survival_probabilities(len(model.blocks), "linear", p_last))


def time_steps(variants, x, y, device, rounds: int, warmup: int) -> dict[str, list[float]]:
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffler = random.Random(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for round_index in range(warmup + rounds):
        shuffler.shuffle(order)
        for name in order:
            model, optimizer = variants[name], optimizers[name]
            sync()
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            sync()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--p-last", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "training_step.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28, device=device)
    y = torch.randint(10, (args.batch_size,), device=device)
    floor = flop_floor(args.p_last, x.cpu(), y.cpu())
    variants = {name: m.to(device).train() for name, m in build_variants(args.p_last).items()}
    times = time_steps(variants, x, y, device, args.rounds, args.warmup)

    plain = statistics.median(times["ResNet-50 (plain)"])
    rows = []
    print(f"\nOne training step, ResNet-50, batch {args.batch_size}x1x28x28, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds}")
    print(f"{'variant':45s} {'median ms':>10s} {'/ plain':>8s}")
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append({"variant": name, "median_s": median, "ratio_to_plain": median / plain, "samples_s": samples})
        print(f"{name:45s} {1e3 * median:10.1f} {median / plain:8.3f}")
    block_ratio = rows[1]["ratio_to_plain"]
    print(f"\nblock mode: measured ratio {block_ratio:.3f}, FLOP floor {floor['floor']:.3f} "
          f"(difference {block_ratio - floor['floor']:+.3f}); "
          f"plain step {floor['total_gflop']:.1f} GFLOP, of which fixed {floor['fixed_gflop']:.1f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "p_last": args.p_last,
        "rounds": args.rounds,
        "flops": floor,
        "results": rows,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
