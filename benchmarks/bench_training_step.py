"""Time one training step of ResNet-50 with and without stochastic depth, beside the peers.

Every variant trains on the same batch, MNIST-sized by default (128 x 1x28x28; ``--image``
sets the image shape, e.g. ``3x224`` for ImageNet-sized, where a GPU step is compute-bound):
forward, cross-entropy, backward and an Adam step. The variants run interleaved, in a
shuffled order each round, and the table reports the median step after warm-up, as a
ratio to the plain ResNet measured in the same run.

Beside the block-mode and row_subset ratios it prints their floors: the fraction of
the plain step's work that stochastic depth still does on average, (fixed + sum q_l
work_l) / (fixed + sum work_l), with each block's work counted in FLOPs (forward and
backward) by ``torch.utils.flop_counter``; q_l is p_l in block mode and k_l / B, the
fraction of samples a row_subset branch runs on, in row_subset mode. Beside each variant's
time it prints the operators of one step (``training_operator_count``): on the device, each
at least one kernel launch on a GPU, and on the host; a small network's GPU step is bound by
them rather than by FLOPs.

Usage::

    python -m benchmarks.bench_training_step [--device cpu] [--batch-size 128] [--rounds 15]
        [--clock process --threads 1]   # CPU time: for a CPU shared with other jobs
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from atomic_files import write_json_atomically
from benchmarks.counters import training_operator_count
from resnet_with_stochastic_depth import (
    ResNet,
    StochasticResNet,
    stochastic_depth_gates,
    survival_probabilities,
)
from stochastic_depth.counting import training_flop_floor
from training import synchronize

PLAIN = "ResNet-50 (plain)"
BLOCK = "StochasticResNet, batch mode"
ROW_SUBSET = "StochasticResNet, row_subset mode"


class TorchvisionMask(nn.Module):
    """The gate a user gets from ``torchvision.ops.stochastic_depth``: the branch always runs."""

    def __init__(self, survival_prob: float, mode: str) -> None:
        super().__init__()
        self.survival_prob, self.mode = survival_prob, mode

    def forward(self, branch, x, shortcut, first=None):
        inputs = x if first is None else first(x)  # (a ResNet block hands its first convolution apart)
        residual = torchvision.ops.stochastic_depth(branch(inputs), 1 - self.survival_prob, self.mode, self.training)
        return shortcut + residual


def resnet50_masked_by_torchvision(mode: str, p_last: float, in_channels: int) -> ResNet:
    model = ResNet.imagenet(50, in_channels=in_channels, num_classes=10)
    for block, p in zip(model.blocks, survival_probabilities(len(model.blocks), "linear", p_last)):
        block.stochastic_depth = TorchvisionMask(p, mode)
    return model


def build_variants(p_last: float, in_channels: int = 1) -> dict[str, nn.Module]:
    import timm

    common = dict(in_channels=in_channels, num_classes=10)
    return {
        PLAIN: ResNet.imagenet(50, **common),
        BLOCK: StochasticResNet.imagenet(50, p_last=p_last, seed=0, **common),
        "StochasticResNet, row mode": StochasticResNet.imagenet(50, p_last=p_last, mode="row", seed=0, **common),
        ROW_SUBSET: StochasticResNet.imagenet(50, p_last=p_last, mode="row_subset", seed=0, **common),
        "torchvision.ops.stochastic_depth, batch": resnet50_masked_by_torchvision("batch", p_last, in_channels),
        "torchvision.ops.stochastic_depth, row": resnet50_masked_by_torchvision("row", p_last, in_channels),
        # timm takes the drop rate of the last block, 1 - p_L.
        f"timm resnet50, drop_path_rate={1 - p_last:g}": timm.create_model(
            "resnet50", in_chans=in_channels, num_classes=10, drop_path_rate=1 - p_last
        ),
    }


def flop_floors(p_last: float, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, float]]:
    """Expected fraction of a plain training step's FLOPs that block and row_subset modes compute."""
    common = dict(in_channels=x.shape[1], num_classes=10)
    model = ResNet.imagenet(50, **common)
    probs = survival_probabilities(len(model.blocks), "linear", p_last)
    subset = StochasticResNet.imagenet(50, p_last=p_last, mode="row_subset", seed=0, **common)
    with torch.no_grad():
        subset(x[:, :, :4, :4])  # a tiny pass, to read the fixed k of each block
    fractions = [gate.last_active.float().mean().item() for gate in stochastic_depth_gates(subset)]
    return {
        "batch": training_flop_floor(model, x, y, probs),
        "row_subset": training_flop_floor(model, x, y, fractions),
    }


def time_steps(variants, x, y, device, rounds: int, warmup: int, clock=time.perf_counter, on_step=None) -> dict[str, list[float]]:
    """Each variant's timed training steps (Adam), interleaved in a shuffled order each round.

    `on_step(name, model)`, if given, is called after each timed step, outside the timing.
    """
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffler = random.Random(0)
    for round_index in range(warmup + rounds):
        shuffler.shuffle(order)
        for name in order:
            model, optimizer = variants[name], optimizers[name]
            synchronize(device)
            start = clock()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            synchronize(device)
            if round_index >= warmup:
                times[name].append(clock() - start)
                if on_step is not None:
                    on_step(name, model)
    return times


def run(device: torch.device, batch_size: int = 128, rounds: int = 15, warmup: int = 3, p_last: float = 0.5,
        clock: str = "wall", image: tuple[int, int, int] = (1, 28, 28)) -> dict:
    """Time every variant on one batch; return what ``main`` writes as JSON.

    `clock`: "wall" (``time.perf_counter``), or on a CPU "process" (``time.process_time``:
    the CPU time of this process, which other jobs on a shared machine barely change; with
    one thread it is the step's compute time).
    """
    if clock == "process" and device.type != "cpu":
        raise ValueError(f"clock='process' measures CPU time: it needs device cpu, got {device}")
    torch.manual_seed(0)
    x = torch.randn(batch_size, *image, device=device)
    y = torch.randint(10, (batch_size,), device=device)
    floors = flop_floors(p_last, x.cpu(), y.cpu())
    variants = {name: m.to(device).train() for name, m in build_variants(p_last, image[0]).items()}
    times = time_steps(variants, x, y, device, rounds, warmup, time.process_time if clock == "process" else time.perf_counter)
    plain = statistics.median(times[PLAIN])
    rows = [
        {"variant": name, "median_s": statistics.median(samples),
         "ratio_to_plain": statistics.median(samples) / plain,
         "operators_per_step": training_operator_count(variants[name], x, y), "samples_s": samples}
        for name, samples in times.items()
    ]
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "image": list(image),
        "p_last": p_last,
        "rounds": rounds,
        "clock": clock,
        "flops": floors["batch"],
        "flops_row_subset": floors["row_subset"],
        "results": rows,
    }


def print_table(result: dict) -> None:
    image = "x".join(map(str, result.get("image", (1, 28, 28))))
    print(f"\nOne training step, ResNet-50, batch {result['batch_size']}x{image}, {result['device']}, "
          f"torch {result['torch']}, {result['threads']} threads, median of {result['rounds']}, "
          f"{result.get('clock', 'wall')} clock")
    print(f"{'variant':45s} {'median ms':>10s} {'/ plain':>8s} {'operators: device':>18s} {'host':>5s}")
    for row in result["results"]:
        operators = row.get("operators_per_step", {"device": "-", "host": "-"})
        print(f"{row['variant']:45s} {1e3 * row['median_s']:10.1f} {row['ratio_to_plain']:8.3f} "
              f"{operators['device']:>18} {operators['host']:>5}")
    ratios = {row["variant"]: row["ratio_to_plain"] for row in result["results"]}
    print()
    for name, floor in ((BLOCK, result["flops"]), (ROW_SUBSET, result["flops_row_subset"])):
        print(f"{name}: measured ratio {ratios[name]:.3f}, FLOP floor {floor['floor']:.3f} "
              f"(difference {ratios[name] - floor['floor']:+.3f})")
    print(f"plain step {result['flops']['total_gflop']:.1f} GFLOP, of which fixed {result['flops']['fixed_gflop']:.1f}")


def parse_image(text: str) -> tuple[int, int, int]:
    """``"3x224"`` -> ``(3, 224, 224)``."""
    try:
        channels, size = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image takes CxS, as in 1x28 or 3x224, got {text!r}") from None
    return channels, size, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image", type=parse_image, default=(1, 28, 28),
                        help="CxS for square CxSxS images (default 1x28); 3x224 is ImageNet-sized")
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--p-last", type=float, default=0.5)
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: CPU time of this process (CPU only), for a machine shared with other jobs")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's choice")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "training_step.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(torch.device(args.device), args.batch_size, args.rounds, args.warmup, args.p_last, args.clock, args.image)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.out, result, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
