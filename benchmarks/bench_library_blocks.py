"""Time one training step of torchvision's, timm's and Hugging Face transformers' networks: their
masking drop path against the same model converted by ``add_stochastic_depth``, in each mode.

Families: timm ViT-S/16, torchvision ConvNeXt-T and EfficientNet-B0, and transformers'
DINOv2 ViT-S/14, ConvNeXt-T and Swin-T (``Dinov2ForImageClassification``, ...; DINOv2 drops
every layer at the one rate, as its config does; Swin drops the attention branches only),
random weights, on one batch of random images (default 32 x 3x64x64) and labels: forward, cross-entropy,
backward and an Adam step (``bench_training_step.time_steps``). For each family and drop
rate (the library's ``drop_path_rate`` / ``stochastic_depth_prob``, spread over the
blocks by the library) the variants run interleaved in one run, in a shuffled order each
round; the table reports each median step as a ratio to the unconverted (masking) model,
beside the FLOP floor of each mode (``stochastic_depth.counting.gate_flop_floor``: the fraction of
the unconverted step's forward and backward FLOPs that the converted model still
computes on average). Where a branch's time does not follow its FLOPs (ConvNeXt's and
EfficientNet's depthwise convolutions, LayerNorms and activations are bound by memory
traffic, not arithmetic, and are all in the branches) the FLOP floor is not the bound;
the table also gives a time floor: the step with every branch dropped, timed in the same
run, as the fixed part, and the branches' measured share of the step scaled by the same
FLOP-weighted fraction of branch work that still runs. Each mode is also compared with the
floor of what its timed steps drew (the mean fraction of the batch each gate ran on over the
timed steps, against the mean step): batch mode draws a new sub-network at each step, so a few
steps may run more or less than expected. One family at a time is held in memory. Beside the times, the bytes autograd saves for backward in one step
(``benchmarks.counters.saved_tensor_bytes``, exact on any machine), as a ratio to the unconverted model's.

Usage::

    python -m benchmarks.bench_library_blocks [--batch-size 32] [--image-size 64]
        [--rates 0.4 0.1] [--rounds 7] [--clock process --threads 1]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from atomic_files import write_json_atomically
from benchmarks.bench_training_step import time_steps
from benchmarks.counters import saved_tensor_bytes
from resnet_with_stochastic_depth import DROP_MODES, add_stochastic_depth, stochastic_depth_gates
from stochastic_depth.counting import gate_flop_floor

MASKING = "unconverted (masking drop path)"
FIXED = "converted, every branch dropped"


def build(family: str, rate: float, image_size: int) -> torch.nn.Module:
    """A family's network with drop rate `rate`, random weights, 10 classes."""
    import timm
    import torchvision

    if family == "ViT-S/16":
        return timm.create_model("vit_small_patch16_224", img_size=image_size, drop_path_rate=rate, num_classes=10)
    if family == "ConvNeXt-T":
        return torchvision.models.convnext_tiny(stochastic_depth_prob=rate, num_classes=10)
    if family == "EfficientNet-B0":
        return torchvision.models.efficientnet_b0(stochastic_depth_prob=rate, num_classes=10)
    if family.startswith("HF "):
        return PixelValuesToLogits(_hugging_face_model(family.removeprefix("HF "), rate, image_size))
    raise ValueError(f"unknown family {family!r}")


def _hugging_face_model(family: str, rate: float, image_size: int) -> torch.nn.Module:
    """transformers' model of `family` in its published shape, from a config (random weights), 10 classes."""
    import transformers as T

    if family == "DINOv2-S/14":
        config = T.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                                patch_size=14, image_size=image_size, drop_path_rate=rate, num_labels=10)  # fmt: skip
        return T.Dinov2ForImageClassification(config)
    if family == "ConvNeXt-T":
        config = T.ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3], drop_path_rate=rate, num_labels=10)
        return T.ConvNextForImageClassification(config)
    if family == "Swin-T":
        config = T.SwinConfig(image_size=image_size, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                              window_size=7, drop_path_rate=rate, num_labels=10)  # fmt: skip
        return T.SwinForImageClassification(config)
    raise ValueError(f"unknown family {family!r}")


class PixelValuesToLogits(torch.nn.Module):
    """A transformers image classifier as ``images -> logits``, the call the benchmark makes."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


FAMILIES = ("ViT-S/16", "ConvNeXt-T", "EfficientNet-B0", "HF DINOv2-S/14", "HF ConvNeXt-T", "HF Swin-T")


def run_family(family: str, rate: float, x: torch.Tensor, y: torch.Tensor, rounds: int, warmup: int, clock) -> dict:
    torch.manual_seed(0)
    unconverted = build(family, rate, x.shape[-1]).train()
    variants = {MASKING: unconverted}
    floors = {}
    for mode in DROP_MODES:
        converted = add_stochastic_depth(copy.deepcopy(unconverted), mode=mode, seed=0)
        variants[f"converted, {mode}"] = converted
        floors[mode] = gate_flop_floor(converted, x, y)
    # What no gate can skip, timed: every branch dropped (the stem, downsampling, head, optimizer).
    variants[FIXED] = add_stochastic_depth(copy.deepcopy(unconverted), "uniform", 0.0, mode="batch", seed=0)
    # What each gate ran on in the timed steps (batch mode draws a new sub-network at every step:
    # a few steps can run more or less than the expected fraction, so each mode is also compared
    # with the floor of the fractions its steps drew).
    kept: dict[str, list[list[float]]] = {name: [] for name in variants}

    def record(name: str, model: torch.nn.Module) -> None:
        kept[name].append([float(g.last_active.float().mean()) for g in stochastic_depth_gates(model)])

    times = time_steps(variants, x, y, x.device, rounds, warmup, clock, on_step=record)
    saved = {name: saved_tensor_bytes(model, x, y) for name, model in variants.items()}
    masking = statistics.median(times[MASKING])
    fixed_time = statistics.median(times[FIXED]) / masking
    rows = []
    for name, samples in times.items():
        mode = name.removeprefix("converted, ") if name.removeprefix("converted, ") in DROP_MODES else None
        ratio = statistics.median(samples) / masking
        row = {"variant": name, "median_s": statistics.median(samples), "ratio_to_masking": ratio, "samples_s": samples,
               "saved_bytes": saved[name], "saved_bytes_to_masking": saved[name] / saved[MASKING]}
        if mode:
            floor = floors[mode]
            fixed_flops = floor["fixed_gflop"] / floor["total_gflop"]
            # The FLOP-weighted fraction of the branches' work that still runs, applied to the
            # branches' measured share of the step instead of their share of the FLOPs.
            kept_work = (floor["floor"] - fixed_flops) / (1 - fixed_flops)
            time_floor = fixed_time + (1 - fixed_time) * kept_work
            drawn = [statistics.fmean(step[g] for step in kept[name]) for g in range(len(kept[name][0]))]
            drawn_floor = gate_flop_floor(variants[name], x, y, fractions=drawn)["floor"]
            mean_ratio = statistics.fmean(samples) / statistics.fmean(times[MASKING])
            row.update(flop_floor=floor["floor"], ratio_minus_flop_floor=ratio - floor["floor"],
                       time_floor=time_floor, ratio_minus_time_floor=ratio - time_floor,
                       drawn_flop_floor=drawn_floor, mean_ratio=mean_ratio, mean_ratio_minus_drawn_floor=mean_ratio - drawn_floor)
        rows.append(row)
    return {
        "family": family,
        "rate": rate,
        "total_gflop": floors["batch"]["total_gflop"],
        "fixed_gflop": floors["batch"]["fixed_gflop"],
        "results": rows,
    }


def print_family(result: dict) -> None:
    print(f"\n{result['family']}, drop rate {result['rate']:g}: step {result['total_gflop']:.1f} GFLOP "
          f"(fixed {result['fixed_gflop']:.1f})")
    print(f"  {'variant':34s} {'median ms':>10s} {'/ masking':>10s} {'saved / m.':>10s} {'FLOP floor':>11s} {'- floor':>8s} "
          f"{'time floor':>11s} {'- floor':>8s} {'drawn floor':>11s} {'mean - drawn':>12s}")
    for row in result["results"]:
        line = f"  {row['variant']:34s} {1e3 * row['median_s']:10.1f} {row['ratio_to_masking']:10.3f} {row['saved_bytes_to_masking']:10.3f}"
        if "flop_floor" in row:
            line += (f" {row['flop_floor']:11.3f} {row['ratio_minus_flop_floor']:+8.3f}"
                     f" {row['time_floor']:11.3f} {row['ratio_minus_time_floor']:+8.3f}"
                     f" {row['drawn_flop_floor']:11.3f} {row['mean_ratio_minus_drawn_floor']:+12.3f}")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES[:3]), choices=FAMILIES)
    parser.add_argument("--rates", nargs="+", type=float, default=[0.4, 0.1])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "process"], default="process",
                        help="process (default): CPU time of this process, for a CPU shared with other jobs")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "library_blocks-cpu.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(10, (args.batch_size,))
    started = time.time()
    results = []
    for family in args.families:
        for rate in args.rates:
            results.append(run_family(family, rate, x, y, args.rounds, args.warmup, clock))
            print_family(results[-1])
    out = {
        "command": "python " + " ".join(sys.argv),
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "image": [3, args.image_size, args.image_size],
        "rounds": args.rounds,
        "warmup": args.warmup,
        "clock": args.clock,
        "wall_s": time.time() - started,
        "families": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.out, out, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
