"""Time one residual branch alone, forward and backward: eager against torch.compile, with
static and with dynamic shapes.

A converted model runs its kept branches on the kept rows only, so its compiled step can be no
faster than inductor's code for those branches. This benchmark isolates them: timm ViT-S/16's
attention and MLP branches of the first block (rows x 17 tokens x 384 at 64x64 images) and
torchvision ConvNeXt-T's first block (rows x 96 x 16 x 16), random weights, the branch
including its norm and layer scale as the converted block runs it. Each round times the three
variants side by side in a shuffled order; the table gives the median step and the compiled
ones' ratio to eager paired by round, with its 95% interval (``run_statistics.paired_ratio``).
A ratio above 1 means that on this machine inductor makes the branch slower than eager
PyTorch, whatever the gate does around it.

Usage::

    python -m benchmarks.bench_compiled_branch [--rows 26] [--rounds 20] [--warmup 3]
        [--threads 1] [--clock process] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from atomic_files import write_json_atomically
from run_statistics import paired_ratio

VARIANTS = ("eager", "compiled, static shapes", "compiled, dynamic shapes")


def branches(rows: int) -> dict[str, tuple[torch.nn.Module, tuple[int, ...]]]:
    """Name -> (branch module, input shape with `rows` samples)."""
    import timm
    import torchvision

    torch.manual_seed(0)
    block = timm.create_model("vit_small_patch16_224", img_size=64, num_classes=10).blocks[0]
    convnext = torchvision.models.convnext_tiny(num_classes=10).features[1][0]
    return {
        "ViT-S/16 attention": (torch.nn.Sequential(block.norm1, block.attn, block.ls1), (rows, 17, 384)),
        "ViT-S/16 MLP": (torch.nn.Sequential(block.norm2, block.mlp, block.ls2), (rows, 17, 384)),
        "ConvNeXt-T block": (_LayerScaled(convnext), (rows, 96, 16, 16)),
    }


class _LayerScaled(torch.nn.Module):
    """torchvision's CNBlock without its residual add and stochastic depth: layer_scale * block(x)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block, self.layer_scale = block.block, block.layer_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_scale * self.block(x)


def time_branch(module: torch.nn.Module, shape: tuple[int, ...], rounds: int, warmup: int, clock) -> dict:
    """Seconds of forward + backward of each of :data:`VARIANTS`, interleaved, a shuffled order each round."""
    x = torch.randn(shape, requires_grad=True)
    calls = {"eager": module, "compiled, static shapes": torch.compile(module, dynamic=False),
             "compiled, dynamic shapes": torch.compile(module, dynamic=True)}  # fmt: skip
    samples = {name: [] for name in calls}
    order, shuffler = list(calls), random.Random(0)
    for round_index in range(warmup + rounds):
        shuffler.shuffle(order)
        for name in order:
            start = clock()
            calls[name](x).sum().backward()
            if round_index >= warmup:
                samples[name].append(clock() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=26, help="samples the branch runs on (default 26 of 32: about "
                        "the mean a ViT-S block keeps at drop rate 0.4)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds, which include compiling")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's choice")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="'process': CPU time of this process (use with --threads 1)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compiled_branch-cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    result = {"command": " ".join(["python -m benchmarks.bench_compiled_branch", *sys.argv[1:]]),
              "device": "cpu", "device_name": platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "clock": args.clock, "rows": args.rows, "rounds": args.rounds,
              "branches": []}  # fmt: skip
    print(f"{'branch':22s} {'variant':26s} {'median ms':>10s}  {'paired / eager [95% CI]':>24s}")
    for name, (module, shape) in branches(args.rows).items():
        samples = time_branch(module, shape, args.rounds, args.warmup, clock)
        rows = []
        for variant in VARIANTS:
            ratio = None if variant == "eager" else paired_ratio(samples[variant], samples["eager"])
            rows.append({"variant": variant, "median_s": statistics.median(samples[variant]), "samples_s": samples[variant],
                         "paired_ratio_to_eager": None if ratio is None else {"mean": ratio["mean"], "ci95": ratio["ci95"]}})  # fmt: skip
            interval = "" if ratio is None else f"{ratio['mean']:.3f} [{ratio['ci95'][0]:.3f}, {ratio['ci95'][1]:.3f}]"
            print(f"{name:22s} {variant:26s} {1e3 * rows[-1]['median_s']:10.2f}  {interval:>24s}")
        result["branches"].append({"branch": name, "input_shape": list(shape), "results": rows})
        torch._dynamo.reset()
    write_json_atomically(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
