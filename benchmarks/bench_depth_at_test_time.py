"""Inference time of a converted timm ViT with its last layers removed at test time (``keep_blocks``).

timm's ViT-S/16 (12 layers, 224x224), converted with ``add_stochastic_depth``, evaluated on one
batch with the last ``k`` layers removed, ``k`` in ``--removed``; CPU time of one thread, the
depths interleaved in each round, median over rounds.

Usage::

    python -m benchmarks.bench_depth_at_test_time --out benchmarks/results/depth_at_test_time.json
        [--batch 8] [--rounds 5] [--removed 0 3 6 9]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch

from atomic_files import write_json_atomically
from stochastic_depth import add_stochastic_depth
from stochastic_depth.evaluation_network import depth_units, keep_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--removed", type=int, nargs="+", default=[0, 3, 6, 9])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = add_stochastic_depth(timm.create_model("vit_small_patch16_224", num_classes=10, drop_path_rate=0.1)).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    layers = len(depth_units(model))
    if any(not 0 <= k < layers for k in args.removed):
        parser.error(f"--removed takes numbers of layers in [0, {layers})")
    times: dict[int, list[float]] = {k: [] for k in args.removed}
    with torch.no_grad():
        for _ in range(args.rounds):
            for k in args.removed:
                with keep_blocks(model, range(layers - k)):
                    start = time.process_time()
                    model(x)
                    times[k].append(time.process_time() - start)
    full = statistics.median(times[args.removed[0]])
    rows = [{"removed": k, "median_ms": 1e3 * statistics.median(t), "ratio": statistics.median(t) / full, "samples_s": t}
            for k, t in times.items()]
    print(f"timm ViT-S/16, 224x224, batch {args.batch}, eval, CPU time of 1 thread, median of {args.rounds}, "
          f"torch {torch.__version__}")
    for row in rows:
        print(f"last {row['removed']:2d} of {layers} layers removed: {row['median_ms']:7.1f} ms  {row['ratio']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.out, {"batch": args.batch, "rounds": args.rounds, "layers": layers,
                                    "torch": torch.__version__, "threads": 1, "clock": "process", "rows": rows}, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
