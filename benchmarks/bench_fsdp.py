"""What FSDP2 communicates with stochastic depth: plain sharding against fully_shard_stochastic_depth.

Two processes (gloo on the CPU) train a timm ViT (ViT-Tiny's width and depth: 192 wide, 12
blocks, 3 heads; patch 8 on 32x32 images, 10 classes) with SGD, in four configurations, one
step of each in turn, on the same batches:

- ``plain FSDP2, drop rate r``: the unconverted model (timm's ``DropPath``, which computes
  every branch and masks it) sharded the standard way, ``fully_shard`` on every block then
  on the root;
- ``recipe, drop rate r``: the same weights after ``add_stochastic_depth`` (batch mode),
  sharded by ``stochastic_depth.distributed.fully_shard_stochastic_depth``;

for r = 0.4 and 0.1 (``drop_path_rate``, spread linearly over the blocks by timm).
``collective_bytes`` counts, on process 0, the bytes each step all-gathers (outputs) and
reduce-scatters (inputs) by wrapping ``torch.distributed``'s collectives, which FSDP2 calls.
The expected fractions, from the parameter counts and the survival probabilities, are
computed beside them, and for ViT-L/16 (224x224, 1000 classes; built on the meta device, no
run) at drop rate 0.4.

Usage::

    python -m benchmarks.bench_fsdp [--batch-size 32] [--rounds 20] [--warmup 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.distributed.fsdp import fully_shard

from atomic_files import write_json_atomically
from benchmarks.counters import collective_bytes
from resnet_with_stochastic_depth import add_stochastic_depth, set_step, stochastic_depth_gates
from stochastic_depth.distributed import branch_modules, fully_shard_stochastic_depth, gated_blocks

ROOT = Path(__file__).resolve().parents[1]
RATES = (0.4, 0.1)


def variants() -> list[str]:
    return [f"{kind}, drop rate {rate}" for rate in RATES for kind in ("plain FSDP2", "recipe")]


def vit_tiny_patch8(rate: float) -> VisionTransformer:
    """ViT-Tiny's shape (192 wide, 12 blocks, 3 heads), patch 8 on 32x32 images, 10 classes."""
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=10, drop_path_rate=rate)


def vit_large_patch16(rate: float) -> VisionTransformer:
    """ViT-L/16 (1024 wide, 24 blocks, 16 heads) on 224x224 images, 1000 classes, on the meta device."""
    with torch.device("meta"):
        return VisionTransformer(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, num_classes=1000,
                                 drop_path_rate=rate)  # fmt: skip


def expected_fractions(model: VisionTransformer, seed: int = 0) -> dict[str, float]:
    """Expected bytes per step of the recipe as a fraction of plain FSDP2's, from the parameter counts.

    Plain FSDP2 all-gathers the root unit once per step (it is not resharded after the
    forward pass) and every block twice (forward, and backward after resharding), and
    reduce-scatters every gradient once. The recipe does the same for the root and for each
    branch with the branch's survival probability; nothing else is gathered (a ViT block has
    no parameters outside its two branches). Padding of shards is left out.
    """
    add_stochastic_depth(model, mode="batch", seed=seed)
    branches = [(getattr(block, gate).survival_prob, children) for block in gated_blocks(model)
                for gate, children in branch_modules(block).items()]  # fmt: skip
    size = [sum(p.numel() for m in children for p in m.parameters()) for _, children in branches]
    total = sum(p.numel() for p in model.parameters())
    root = total - sum(size)
    kept = sum(p * n for (p, _), n in zip(branches, size))
    return {
        "parameters": total,
        "branch_parameters": sum(size),
        "all_gathered": (root + 2 * kept) / (root + 2 * sum(size)),
        "reduce_scattered": (root + kept) / total,
    }


def _shard_plain(model: VisionTransformer) -> VisionTransformer:
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def worker(rank: int, tmp: str, args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    torch.set_num_threads(args.threads)
    models = {}
    for rate in RATES:
        for kind in ("plain FSDP2", "recipe"):
            torch.manual_seed(0)  # the same weights in every configuration
            model = vit_tiny_patch8(rate)
            model = fully_shard_stochastic_depth(add_stochastic_depth(model, mode="batch", seed=0)) if kind == "recipe" else _shard_plain(model)
            models[f"{kind}, drop rate {rate}"] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    g = torch.Generator().manual_seed(rank)
    times = {name: [] for name in models}
    gathered = {name: [] for name in models}
    scattered = {name: [] for name in models}
    kept = {name: [] for name in models}
    for step in range(args.warmup + args.rounds):
        x = torch.randn(args.batch_size, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (args.batch_size,), generator=g)
        for name, (model, optimizer) in models.items():
            if name.startswith("recipe"):
                set_step(model, step)
            dist.barrier()  # both processes start the step together
            with collective_bytes() as sent:
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                elapsed = time.perf_counter() - start
            if step >= args.warmup:
                times[name].append(elapsed)
                gathered[name].append(sent.all_gathered)
                scattered[name].append(sent.reduce_scattered)
                if name.startswith("recipe"):
                    gates = stochastic_depth_gates(model)
                    kept[name].append(sum(bool(g.last_active) for g in gates) / len(gates))
    result = {
        "median_step_s": {name: statistics.median(t) for name, t in times.items()},
        "all_gathered_bytes_per_step": {name: statistics.mean(b) for name, b in gathered.items()},
        "reduce_scattered_bytes_per_step": {name: statistics.mean(b) for name, b in scattered.items()},
        "fraction_of_branches_kept": {name: statistics.mean(k) for name, k in kept.items() if k},
    }
    torch.save(result, f"{tmp}/{rank}.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/fsdp-cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(tmp, args), nprocs=2, start_method="spawn")
        ranks = [torch.load(f"{tmp}/{rank}.pt") for rank in range(2)]
    names = variants()
    # A step ends when the slower process ends it: report the larger median of the two.
    step_s = {name: max(r["median_step_s"][name] for r in ranks) for name in names}
    measured = ranks[0]
    report = {
        "config": vars(args) | {"output": None, "processes": 2, "backend": "gloo", "torch": torch.__version__,
                                "model": "timm VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=10)"},  # fmt: skip
        "median_step_s": step_s,
        "all_gathered_bytes_per_step": measured["all_gathered_bytes_per_step"],
        "reduce_scattered_bytes_per_step": measured["reduce_scattered_bytes_per_step"],
        "fraction_of_branches_kept": measured["fraction_of_branches_kept"],
        "ratios": {},
        "vit_large_patch16_rate_0.4_expected": expected_fractions(vit_large_patch16(0.4)),
    }
    print(f"ViT-Tiny shape, patch 8 on 32x32, 2 gloo processes, batch {args.batch_size} per process, "
          f"{args.rounds} steps after {args.warmup} warm-up steps")  # fmt: skip
    print("| drop rate | all-gathered / plain (expected) | reduce-scattered / plain (expected) | step / plain |")
    print("|---|---:|---:|---:|")
    for rate in RATES:
        plain, recipe = f"plain FSDP2, drop rate {rate}", f"recipe, drop rate {rate}"
        expected = expected_fractions(vit_tiny_patch8(rate))
        ratios = {
            "all_gathered": report["all_gathered_bytes_per_step"][recipe] / report["all_gathered_bytes_per_step"][plain],
            "expected_all_gathered": expected["all_gathered"],
            "reduce_scattered": report["reduce_scattered_bytes_per_step"][recipe] / report["reduce_scattered_bytes_per_step"][plain],
            "expected_reduce_scattered": expected["reduce_scattered"],
            "step_time": step_s[recipe] / step_s[plain],
        }
        report["ratios"][str(rate)] = ratios
        print(f"| {rate} | {ratios['all_gathered']:.3f} ({ratios['expected_all_gathered']:.3f}) | "
              f"{ratios['reduce_scattered']:.3f} ({ratios['expected_reduce_scattered']:.3f}) | {ratios['step_time']:.3f} |")  # fmt: skip
    for name in names:
        print(f"{name}: median step {1000 * step_s[name]:.1f} ms, all-gathered {report['all_gathered_bytes_per_step'][name] / 1e6:.3f} MB, "
              f"reduce-scattered {report['reduce_scattered_bytes_per_step'][name] / 1e6:.3f} MB per step")  # fmt: skip
    large = report["vit_large_patch16_rate_0.4_expected"]
    print(f"ViT-L/16 at drop rate 0.4 (expected, from {large['parameters']:,} parameters): all-gathered "
          f"{large['all_gathered']:.3f}, reduce-scattered {large['reduce_scattered']:.3f} of plain FSDP2")  # fmt: skip
    output = args.output or ROOT / "benchmarks" / "results" / "fsdp-cpu.json"
    write_json_atomically(output, report, indent=1)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
