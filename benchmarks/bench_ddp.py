"""What DistributedDataParallel costs with stochastic depth: find_unused_parameters and communication.

Two processes (gloo on CPU by default, NCCL with ``--device cuda`` on two GPUs) train a CIFAR
ResNet in three configurations, one step of each in turn, on the same batches:

- ``plain, find_unused=False``: plain DDP, the baseline;
- ``plain, find_unused=True``: the same network with the flag stochastic depth needs, so the
  difference is the flag's own cost (an extra traversal of the autograd graph each step);
- ``stochastic, find_unused=True``: stochastic depth (p_L = 0.5) as one has to run it.

A communication hook counts the gradient bytes each step all-reduces, and beside them the
expected bytes that belong to the parameters of dropped blocks: DDP all-reduces every bucket
whole (a dropped block's gradients travel as zeros), so these are what dropping could save in
communication if DDP left them out.

Usage::

    python -m benchmarks.bench_ddp [--depth 20] [--batch-size 32] [--rounds 15] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from atomic_files import write_json_atomically
from resnet_with_stochastic_depth import ResNet, StochasticResNet
from training import synchronize

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = ("plain, find_unused=False", "plain, find_unused=True", "stochastic, find_unused=True")


def counting_allreduce(state, bucket):  # no annotations: DDP checks them, and this file's are strings
    """DDP's default all-reduce of a ``dist.GradBucket``, counting the bytes it sends in ``state``."""
    state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(None, bucket)


def gradient_bytes(depth: int) -> dict[str, float]:
    """Gradient bytes of a stochastic CIFAR ResNet (float32), and the expected bytes of its dropped blocks per step."""
    model = StochasticResNet.cifar(depth, p_last=0.5)
    dropped = sum(
        (1 - p) * sum(q.numel() * 4 for n, q in block.named_parameters() if not n.startswith("downsample"))
        for block, p in zip(model.blocks, model.survival_probabilities)
    )
    total = sum(q.numel() * 4 for q in model.parameters())
    return {"parameter_bytes": total, "expected_dropped_bytes_per_step": dropped, "dropped_fraction": dropped / total}


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(args.threads)
    models, counters = {}, {}
    for name in VARIANTS:
        torch.manual_seed(0)
        model = (StochasticResNet.cifar(args.depth, p_last=0.5, seed=0) if name.startswith("stochastic") else ResNet.cifar(args.depth)).to(device)
        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                      find_unused_parameters=name.endswith("True"))  # fmt: skip
        counters[name] = {"bytes": 0}
        ddp.register_comm_hook(counters[name], counting_allreduce)
        models[name] = (ddp, torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4))
    g = torch.Generator().manual_seed(rank)
    times = {name: [] for name in VARIANTS}
    sent = {name: [] for name in VARIANTS}
    for round_index in range(args.warmup + args.rounds):
        x = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
        for name, (ddp, optimizer) in models.items():
            counters[name]["bytes"] = 0
            synchronize(device)
            dist.barrier()  # both processes start the step together
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x), y).backward()
            optimizer.step()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_index >= args.warmup:
                times[name].append(elapsed)
                sent[name].append(counters[name]["bytes"])
    results[rank] = {
        "median_step_s": {name: statistics.median(t) for name, t in times.items()},
        "allreduced_bytes_per_step": {name: statistics.mean(b) for name, b in sent.items()},
    }
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/ddp_overhead[-cuda].json")
    args = parser.parse_args()
    from torch.distributed.elastic.utils.distributed import get_free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(2, get_free_port(), args, results), nprocs=2)
        ranks = [dict(results[0]), dict(results[1])]
    # A step ends when the slower process ends it: report the larger median of the two.
    step_s = {name: max(r["median_step_s"][name] for r in ranks) for name in VARIANTS}
    report = {
        "config": vars(args) | {"output": None, "processes": 2, "torch": torch.__version__},
        "median_step_s": step_s,
        "ratio_to_plain_ddp": {name: step_s[name] / step_s[VARIANTS[0]] for name in VARIANTS},
        "allreduced_bytes_per_step": ranks[0]["allreduced_bytes_per_step"],
        **gradient_bytes(args.depth),
        "resnet110": gradient_bytes(110),
    }
    report["dropped_fraction_of_allreduced"] = report["expected_dropped_bytes_per_step"] / report["allreduced_bytes_per_step"][VARIANTS[2]]
    print(f"ResNet-{args.depth} (CIFAR), 2 processes ({args.device}), batch {args.batch_size} per process, "
          f"median of {args.rounds} steps")  # fmt: skip
    print("| DDP configuration | step ms | / plain DDP | all-reduced per step |")
    print("|---|---:|---:|---:|")
    for name in VARIANTS:
        print(f"| {name} | {1000 * step_s[name]:.1f} | {report['ratio_to_plain_ddp'][name]:.3f} | "
              f"{report['allreduced_bytes_per_step'][name] / 1e6:.3f} MB |")  # fmt: skip
    print(f"parameters: {report['parameter_bytes'] / 1e6:.3f} MB; expected bytes of dropped blocks per step: "
          f"{report['expected_dropped_bytes_per_step'] / 1e6:.3f} MB "
          f"({100 * report['dropped_fraction_of_allreduced']:.1f}% of what is all-reduced)")  # fmt: skip
    r110 = report["resnet110"]
    print(f"ResNet-110: {r110['parameter_bytes'] / 1e6:.3f} MB of gradients per step, of which "
          f"{r110['expected_dropped_bytes_per_step'] / 1e6:.3f} MB ({100 * r110['dropped_fraction']:.1f}%) "
          "belong to dropped blocks on average")  # fmt: skip
    output = args.output or ROOT / "benchmarks" / "results" / f"ddp_overhead{'-cuda' if args.device == 'cuda' else ''}.json"
    write_json_atomically(output, report, indent=1)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
