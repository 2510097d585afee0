"""Time a training step of torchvision's and timm's networks with and without torch.compile:
their masking drop path against the same model converted by ``add_stochastic_depth``.

For each family (timm ViT-S/16 and torchvision ConvNeXt-T at drop rate 0.4, timm ResNet-50
at drop rate 0.5, i.e. p_L = 0.5), random weights, one batch of random images and labels,
the variants train (forward, cross-entropy, backward, AdamW step) interleaved in a shuffled
order each round:

- ``masking, eager``: the library's own drop path (timm ``DropPath``, torchvision
  ``StochasticDepth``), which computes every branch and multiplies the dropped ones by 0;
- ``masking, torch.compile``: ``torch.compile(model)`` of that. timm's ``DropPath`` and
  torchvision's ``StochasticDepth`` make each block a frame of its own whose drop
  probability dynamo specialises (timm's ViT-S: 12 variants of ``Block.forward``; a
  ResNet-50's Bottleneck: one per shape), beyond its recompile limit of 8, after which the
  remaining blocks run eagerly; ``recompile limit 64`` is the same compiled with
  ``torch._dynamo.config.recompile_limit = 64``, and compiled variants are compared with
  the faster of the two;
- ``converted, eager``: ``add_stochastic_depth(model)`` (row_subset, the library's rates);
- ``converted, torch.compile``: ``torch.compile(converted)``, the idiom;
- ``converted, compile_branches``: regional compilation of the converted model.

The table gives each median step (wall clock, the default number of threads), its ratio
to the masking step of the same kind (eager to eager, compiled to compiled) and to the
eager converted step, for the converted variants the same ratio paired by round (the
geometric mean of each round's ratio, with its 95% interval: steps timed side by side share
the machine's state, so the interval says whether a difference is more than noise), the
wall time of the warm-up steps (the compiled variants compile there), and the FLOP floor (``stochastic_depth.counting.gate_flop_floor``). On CUDA,
``--autocast bf16`` adds the compiled variants under bf16 autocast and ``--cuda-graphs``
those compiled with ``mode="reduce-overhead"`` (after the float32 variants of every family,
and only within ``--budget-s``, so that the run ends in under 8 minutes); a variant that
fails is recorded with its error and the others still run.

Usage::

    python -m benchmarks.bench_compile_families [--device cpu] [--families ViT-S/16 ConvNeXt-T ResNet-50]
        [--batch-size 32] [--image-size 64] [--rounds 10] [--warmup 3] [--out FILE]
    python -m benchmarks.bench_compile_families --device cuda --autocast bf16 --cuda-graphs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from atomic_files import write_json_atomically
from resnet_with_stochastic_depth import add_stochastic_depth
from run_statistics import paired_ratio
from stochastic_depth.compilation import compile_branches
from stochastic_depth.counting import gate_flop_floor
from training import synchronize

# family: drop rate (the library's drop_path_rate / stochastic_depth_prob, the last block's)
FAMILIES = {"ViT-S/16": 0.4, "ConvNeXt-T": 0.4, "ResNet-50": 0.5}
MASKING_EAGER, MASKING_COMPILED = "masking, eager", "masking, torch.compile"
# torch.compile of the masking model with a recompile limit its blocks do not reach (see the docstring)
MASKING_UNLIMITED = "masking, torch.compile, recompile limit 64"
CONVERTED_EAGER, IDIOM, REGIONAL = "converted, eager", "converted, torch.compile", "converted, compile_branches"


def build(family: str, image_size: int) -> torch.nn.Module:
    """A family's network with its masking drop path at the family's rate, random weights, 10 classes."""
    import timm
    import torchvision

    rate = FAMILIES[family]
    if family == "ViT-S/16":
        return timm.create_model("vit_small_patch16_224", img_size=image_size, drop_path_rate=rate, num_classes=10)
    if family == "ConvNeXt-T":
        return torchvision.models.convnext_tiny(stochastic_depth_prob=rate, num_classes=10)
    if family == "ResNet-50":
        return timm.create_model("resnet50", drop_path_rate=rate, num_classes=10)
    raise ValueError(f"unknown family {family!r}")


def variants(family: str, image_size: int, device: torch.device, options: dict, eager: bool = True) -> dict:
    """The variants of `family` (the compiled ones with `options`; the eager ones too if `eager`),
    each a fresh copy of the same weights."""
    torch.manual_seed(0)
    masking = build(family, image_size).to(device).train()
    converted = add_stochastic_depth(copy.deepcopy(masking), seed=0)
    out = {MASKING_EAGER: masking, CONVERTED_EAGER: converted} if eager else {}
    out[MASKING_COMPILED] = torch.compile(copy.deepcopy(masking), **options)
    out[MASKING_UNLIMITED] = torch.compile(copy.deepcopy(masking), **options)
    out[IDIOM] = torch.compile(copy.deepcopy(converted), **options)
    out[REGIONAL] = compile_branches(copy.deepcopy(converted), **options)
    return out


def time_variants(models: dict, x, y, device, rounds: int, warmup: int, autocast: torch.dtype | None,
                  clock=time.perf_counter) -> dict:
    """Warm-up seconds (wall) and timed steps (`clock`) of each variant, interleaved in a shuffled order each round.

    A variant whose step raises is dropped from later rounds, its error recorded.
    """
    parameters = {name: list(getattr(m, "_orig_mod", m).parameters()) for name, m in models.items()}
    optimizers = {name: torch.optim.AdamW(p, lr=1e-4) for name, p in parameters.items()}
    results = {name: {"warmup_s": 0.0, "samples_s": [], "error": None} for name in models}
    order = list(models)
    shuffler = random.Random(0)
    for round_index in range(warmup + rounds):
        if round_index:  # the first round in construction order
            shuffler.shuffle(order)
        for name in order:
            if results[name]["error"]:
                continue
            model, optimizer = models[name], optimizers[name]
            try:
                synchronize(device)
                start, step_start = time.perf_counter(), clock()
                torch.compiler.cudagraph_mark_step_begin()  # a new training step, for CUDA graph trees
                optimizer.zero_grad(set_to_none=True)
                limit = torch._dynamo.config.patch(recompile_limit=64) if name == MASKING_UNLIMITED else contextlib.nullcontext()
                with limit, torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                synchronize(device)
                elapsed, step_elapsed = time.perf_counter() - start, clock() - step_start
            except Exception as error:  # a variant that cannot run is reported, the others go on
                results[name]["error"] = f"{type(error).__name__}: {error}"
                traceback.print_exc()
                continue
            if round_index < warmup:
                results[name]["warmup_s"] += elapsed
            else:
                results[name]["samples_s"].append(step_elapsed)
    return results


def groups_of_variants(backend: str, autocast: torch.dtype | None, cuda_graphs: bool,
                       inductor_options: dict | None = None) -> list[tuple]:
    """(suffix of the variants' names, autocast dtype, torch.compile options, whether the eager
    variants run too): float32 first, then under `autocast`, then with CUDA graphs. Every
    compiled variant, masking ones included, gets `inductor_options` (``torch.compile(options=)``)."""
    options = {"backend": backend, **({"options": inductor_options} if inductor_options else {})}
    groups = [("", None, options, True)]
    if autocast is not None:
        groups.append((f", {autocast_name(autocast)} autocast", autocast, options, True))
    if cuda_graphs:
        # (mode= and options= are exclusive in torch.compile: the CUDA-graph group has the mode only)
        groups.append((", CUDA graphs", None, {"backend": backend, "mode": "reduce-overhead"}, False))
    return groups


def inductor_option(text: str) -> tuple[str, bool | int | float | str]:
    """``KEY=VALUE`` of ``--inductor-option``: VALUE as a bool (true/false), a number or a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. force_layout_optimization=true), got {text!r}")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def new_family(family: str, device: torch.device, batch_size: int, image_size: int) -> dict:
    """The result of `family` before any step: its batch, FLOP count and floor; rows come per group."""
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(10, (batch_size,), device=device)
    torch.manual_seed(0)
    floor = gate_flop_floor(add_stochastic_depth(build(family, image_size).to(device).train(), seed=0), x, y)
    return {"family": family, "drop_rate": FAMILIES[family], "total_gflop": floor["total_gflop"],
            "flop_floor": floor["floor"], "wall_s": 0.0, "skipped_groups": [], "results": [], "batch": (x, y)}


def run_group(result: dict, group: tuple, device: torch.device, image_size: int, rounds: int, warmup: int,
              clock=time.perf_counter) -> None:
    """Time one group of variants of `result`'s family and add its rows to `result`."""
    suffix, dtype, options, eager = group
    started = time.perf_counter()
    x, y = result["batch"]
    results = time_variants(variants(result["family"], image_size, device, options, eager), x, y, device, rounds,
                            warmup, dtype, clock)
    median = {name: statistics.median(r["samples_s"]) if r["samples_s"] else None for name, r in results.items()}
    if eager:
        result["eager_converted_s"] = median[CONVERTED_EAGER]
    # Compiled variants against the faster of the two compiled masking ones.
    compiled_masking = min((m for m in (median.get(MASKING_COMPILED), median.get(MASKING_UNLIMITED)) if m), default=None)
    paired = paired_to_masking(results)
    for name, r in results.items():
        masking = compiled_masking if "compile" in name else median.get(MASKING_EAGER)
        result["results"].append({
            "variant": name + suffix,
            "median_s": median[name],
            "ratio_to_masking": _ratio(median[name], masking),
            # (the CUDA-graph group has no eager variants: the float32 eager converted step)
            "ratio_to_eager_converted": _ratio(median[name], result.get("eager_converted_s")),
            "paired_ratio_to_masking": paired.get(name),
            "warmup_s": r["warmup_s"],
            "flop_floor": result["flop_floor"] if name.startswith("converted") else None,
            "error": r["error"],
            "samples_s": r["samples_s"],
        })
    result["wall_s"] += time.perf_counter() - started
    torch._dynamo.reset()  # one group's compiled code at a time


def paired_to_masking(results: dict) -> dict:
    """Per converted variant of one group: ``{"mean", "ci95"}`` of its step over the masking step of the same round.

    The masking step is the eager one for the eager variant and, for compiled ones, the faster of the two
    compiled masking steps of that round (as the medians compare). `results` is :func:`time_variants`'s; a
    variant whose rounds do not pair up with its reference's (one of them failed part-way) is left out.
    """
    samples = {name: r["samples_s"] for name, r in results.items()}
    compiled = [s for s in (samples.get(MASKING_COMPILED), samples.get(MASKING_UNLIMITED)) if s]
    references = {"eager": samples.get(MASKING_EAGER),
                  "compiled": [min(steps) for steps in zip(*compiled)] if compiled else None}  # fmt: skip
    out = {}
    for name, steps in samples.items():
        reference = references["compiled" if "compile" in name else "eager"]
        if name.startswith("converted") and steps and reference and len(steps) == len(reference) > 1:
            ratio = paired_ratio(steps, reference)
            out[name] = {"mean": ratio["mean"], "ci95": ratio["ci95"]}
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def autocast_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def print_family(result: dict) -> None:
    print(f"\n{result['family']}, drop rate {result['drop_rate']:g}: step {result['total_gflop']:.1f} GFLOP, "
          f"FLOP floor {result['flop_floor']:.3f}")
    print(f"  {'variant':46s} {'median ms':>10s} {'/ masking':>10s} {'/ eager conv.':>13s} {'warm-up s':>10s}"
          f"  {'paired / masking [95% CI]':>26s}")
    if result["skipped_groups"]:
        print(f"  skipped (over the time budget): {', '.join(result['skipped_groups'])}")
    for row in result["results"]:
        if row["error"]:
            print(f"  {row['variant']:46s} failed: {row['error'][:120]}")
            continue
        cells = [f"{1e3 * row['median_s']:10.1f}"] + [
            f"{row[k]:{w}.3f}" if row[k] is not None else " " * w
            for k, w in (("ratio_to_masking", 10), ("ratio_to_eager_converted", 13))]
        paired = row.get("paired_ratio_to_masking")
        interval = f"{paired['mean']:.3f} [{paired['ci95'][0]:.3f}, {paired['ci95'][1]:.3f}]" if paired else ""
        print(f"  {row['variant']:46s} {' '.join(cells)} {row['warmup_s']:10.1f}  {interval:>26s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None, help="default: 64 on the CPU, 224 on CUDA")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per variant; default 10 (CPU), 30 (CUDA)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant, which include compiling")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--autocast", choices=["bf16"], help="also the compiled variants under this autocast")
    parser.add_argument("--cuda-graphs", action="store_true", help='also the compiled variants with mode="reduce-overhead"')
    parser.add_argument("--inductor-option", type=inductor_option, action="append", default=[], metavar="KEY=VALUE",
                        help="an inductor config for every compiled variant, e.g. force_layout_optimization=true "
                             "(channels_last also in backward graphs: pytorch/pytorch#189239); repeatable")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's choice")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: the steps' CPU time (CPU only), for a CPU shared with other jobs; warm-up is wall time")
    parser.add_argument("--budget-s", type=float, default=240,
                        help="start no autocast or CUDA-graph group after this many seconds (default 240, for a "
                             "run of under 8 minutes); the float32 variants of every family always run")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/compile_families-DEVICE.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.clock == "process" and device.type != "cpu":
        parser.error("--clock process measures CPU time: it needs --device cpu")
    clock = time.process_time if args.clock == "process" else time.perf_counter
    if args.cuda_graphs and device.type != "cuda":
        parser.error("--cuda-graphs needs --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    image_size = args.image_size or (224 if device.type == "cuda" else 64)
    rounds = args.rounds or (30 if device.type == "cuda" else 10)
    autocast = torch.bfloat16 if args.autocast == "bf16" else None
    out = args.out or Path(__file__).parent / "results" / f"compile_families-{device.type}.json"
    started = time.time()
    deadline = time.perf_counter() + args.budget_s
    results = [new_family(family, device, args.batch_size, image_size) for family in args.families]
    # Group by group, so that the float32 table covers every family; the later groups start only
    # within the time budget.
    inductor_options = dict(args.inductor_option)
    for index, group in enumerate(groups_of_variants(args.backend, autocast, args.cuda_graphs, inductor_options)):
        for result in results:
            if index and time.perf_counter() > deadline:
                result["skipped_groups"].append(group[0].removeprefix(", "))
                continue
            run_group(result, group, device, image_size, rounds, args.warmup, clock)
    for result in results:
        del result["batch"]
        print_family(result)
    write_json_atomically(out, {
        "command": "python -m benchmarks.bench_compile_families " + " ".join(sys.argv[1:]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "image": [3, image_size, image_size],
        "rounds": rounds,
        "warmup": args.warmup,
        "backend": args.backend,
        "inductor_options": inductor_options,
        "clock": args.clock,
        "budget_s": args.budget_s,
        "wall_s": time.time() - started,
        "families": results,
    }, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
