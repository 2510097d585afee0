"""Time a training step with the residual branches compiled (``compile_branches``) against eager.

For each network, four variants train on the same batch (forward, cross-entropy,
backward, SGD step): the plain ResNet and the StochasticResNet (batch mode, p_L = 0.5, or
``--drop-mode``), each eager and with ``compile_branches(model, backend="inductor")``
(``--compile-mode reduce-overhead`` replays each compiled branch as a CUDA graph). The variants run
interleaved, in a shuffled order each round; the table reports the median step after
the warm-up steps, as a ratio to the eager plain step, and the wall time of the compiled
variants' warm-up (which includes compiling: forward and backward of every kind of branch,
in train mode; the plain model and its stochastic twin share the compiled branches, so the
one built first pays).

Usage::

    python -m benchmarks.bench_compile [--device cpu] [--networks resnet20] [--batch-size 32]
        [--rounds 10] [--warmup 3] [--clock process --threads 1] [--out benchmarks/results/compile.json]
        [--drop-mode row_subset] [--compile-mode reduce-overhead]
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

from atomic_files import write_json_atomically
from stochastic_depth.compilation import compile_branches
from training import build_resnet, synchronize

# name: (layout, depth, options of both models, input shape of one sample)
MNIST_INPUT = {"in_channels": 1, "num_classes": 10}
NETWORKS = {
    "resnet20": ("cifar", 20, {}, (3, 32, 32)),
    "resnet56": ("cifar", 56, {}, (3, 32, 32)),
    "resnet110": ("cifar", 110, {}, (3, 32, 32)),
    "resnet50": ("imagenet", 50, MNIST_INPUT, (1, 28, 28)),
    "resnet152": ("imagenet", 152, MNIST_INPUT, (1, 28, 28)),
}


def measure(network: str, device: torch.device, batch_size: int, rounds: int, warmup: int,
            backend: str = "inductor", clock: str = "wall", drop_mode: str = "batch",
            compile_mode: str | None = None) -> dict:
    """Median step times of the four variants of `network`, and the compiled variants' warm-up time.

    `clock`: "wall", or on a CPU "process" (CPU time of this process, which other jobs on a
    shared machine barely change); the warm-up is always wall time. `drop_mode` is the
    StochasticResNet's `mode`; `compile_mode` is torch.compile's `mode` (None: its default).
    """
    if clock == "process" and device.type != "cpu":
        raise ValueError(f"clock='process' measures CPU time: it needs device cpu, got {device}")
    step_clock = time.process_time if clock == "process" else time.perf_counter
    layout, depth, options, sample_shape = NETWORKS[network]
    torch.manual_seed(0)
    x = torch.randn(batch_size, *sample_shape, device=device)
    y = torch.randint(10, (batch_size,), device=device)
    variants = {}
    for compiled in (False, True):
        for stochastic in (None, dict(p_last=0.5, mode=drop_mode, seed=0)):
            model = build_resnet(layout, depth, seed=0, stochastic=stochastic, **options).to(device).train()
            if compiled:
                compile_branches(model, backend=backend, mode=compile_mode)
            name = f"{type(model).__name__}{', branches compiled' if compiled else ', eager'}"
            variants[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))

    times: dict[str, list[float]] = {name: [] for name in variants}
    warmup_s = {name: 0.0 for name in variants}
    order = list(variants)
    shuffler = random.Random(0)
    for round_index in range(warmup + rounds):
        if round_index:  # the first round in construction order: the plain model compiles first
            shuffler.shuffle(order)
        for name in order:
            model, optimizer = variants[name]
            synchronize(device)
            start, step_start = time.perf_counter(), step_clock()
            torch.compiler.cudagraph_mark_step_begin()  # a new training step, for CUDA graph trees
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            synchronize(device)
            if round_index < warmup:
                warmup_s[name] += time.perf_counter() - start
            else:
                times[name].append(step_clock() - step_start)
    eager_plain = statistics.median(times["ResNet, eager"])
    rows = [
        {"variant": name, "median_s": statistics.median(t), "ratio_to_eager_plain": statistics.median(t) / eager_plain,
         "warmup_s": warmup_s[name], "samples_s": t}
        for name, t in times.items()
    ]
    return {"network": network, "batch_size": batch_size, "sample_shape": list(sample_shape), "rounds": rounds,
            "warmup": warmup, "backend": backend, "clock": clock, "drop_mode": drop_mode,
            "compile_mode": compile_mode, "results": rows}


def print_table(result: dict, device: torch.device) -> None:
    shape = "x".join(map(str, result["sample_shape"]))
    modes = f"{result.get('drop_mode', 'batch')} mode, compile mode {result.get('compile_mode') or 'default'}"
    print(f"\n{result['network']}, batch {result['batch_size']}x{shape}, {device}, {result['backend']}, {modes}, "
          f"median of {result['rounds']} steps after {result['warmup']} warm-up steps, {result['clock']} clock")
    print(f"{'variant':40s} {'median ms':>10s} {'/ eager plain':>14s} {'warm-up s':>10s}")
    for row in result["results"]:
        print(f"{row['variant']:40s} {1e3 * row['median_s']:10.2f} {row['ratio_to_eager_plain']:14.3f} "
              f"{row['warmup_s']:10.1f}")


def environment(device: torch.device) -> dict:
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--networks", nargs="+", default=["resnet20"], choices=sorted(NETWORKS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--drop-mode", default="batch", choices=["batch", "row", "row_subset"])
    parser.add_argument("--compile-mode", help="torch.compile's mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: CPU time of this process (CPU only), for a machine shared with other jobs")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's choice")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compile.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for network in args.networks:
        results.append(measure(network, device, args.batch_size, args.rounds, args.warmup, args.backend, args.clock,
                               args.drop_mode, args.compile_mode))
        print_table(results[-1], device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.out, {**environment(device), "networks": results}, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
