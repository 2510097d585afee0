"""LayerDrop in a transformers Wav2Vec2: its own draw against the converted layers, on one process and under FSDP2.

Model: ``Wav2Vec2ForCTC`` in wav2vec2-base's shape (12 layers, 768 wide, 12 heads, the
convolutional feature encoder), random weights, on random audio, at ``layerdrop`` 0.1 and 0.3;
the loss is the mean square of the logits (no labels needed), SGD.

**One process** (``--part time``): one training step of each variant in turn, in a shuffled
order each round, timed with the CPU time of this process on one thread:

- ``transformers LayerDrop``: the unconverted model, which draws ``torch.rand([])`` per layer;
- ``converted``: the same weights after ``add_stochastic_depth`` (a gate per layer, batch mode);
- ``no LayerDrop``: the unconverted model with ``layerdrop = 0`` (every layer runs);
- ``every layer dropped``: converted, every gate at survival 0: the part no layer drop can skip.

Both LayerDrop variants skip layers, but draw different ones, so each is compared by the
time of one layer: ``(mean step - every-layer-dropped step) / mean layers run``, counted by a
forward hook on each layer's attention (which runs only where the layer runs).

**FSDP2** (``--part fsdp``, 2 gloo processes): ``transformers LayerDrop under FSDP2``: the
unconverted model with ``fully_shard`` on each encoder layer and on the root (the standard
recipe), its encoder marked as FSDP-managed (``_is_fsdp_managed_module``, which transformers
reads to keep the processes in step: it then runs every layer); ``recipe``: the converted model
sharded by ``fully_shard_stochastic_depth``. ``collective_bytes`` counts on process 0 the bytes
each step all-gathers; the expected bytes of the recipe are the transformers variant's less two
all-gathers (forward, backward) of each dropped layer, from the parameters' padded shard sizes.

Usage::

    python -m benchmarks.bench_layer_drop --part time [--rounds 8] [--batch-size 4] [--seconds 1]
    python -m benchmarks.bench_layer_drop --part fsdp [--rounds 4]
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

from atomic_files import write_json_atomically
from benchmarks.counters import collective_bytes
from stochastic_depth import add_stochastic_depth, set_step, stochastic_depth_gates
from stochastic_depth.distributed import fully_shard_stochastic_depth

ROOT = Path(__file__).resolve().parents[1]
RATES = (0.1, 0.3)
SAMPLE_RATE = 16_000


def wav2vec2_base(layerdrop: float) -> nn.Module:
    """wav2vec2-base's shape (``Wav2Vec2Config()`` defaults: 12 layers, 768 wide), random weights, no SpecAugment."""
    import transformers

    torch.manual_seed(0)  # the same weights in every variant
    config = transformers.Wav2Vec2Config(layerdrop=layerdrop, mask_time_prob=0.0, vocab_size=32)
    return transformers.Wav2Vec2ForCTC(config)


def _loss(model: nn.Module, audio: torch.Tensor) -> torch.Tensor:
    return model(input_values=audio).logits.square().mean()


def _count_layers(model: nn.Module) -> list[int]:
    """A one-item counter of the encoder layers that run (a hook on each layer's attention)."""
    runs = [0]
    for layer in model.wav2vec2.encoder.layers:
        layer.attention.register_forward_hook(lambda m, args, out: runs.__setitem__(0, runs[0] + 1))
    return runs


def time_part(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    audio = torch.randn(args.batch_size, int(args.seconds * SAMPLE_RATE), generator=torch.Generator().manual_seed(1))
    results = []
    for rate in RATES:
        variants = {
            "transformers LayerDrop": wav2vec2_base(rate),
            "converted": add_stochastic_depth(wav2vec2_base(rate), seed=0),
            "no LayerDrop": wav2vec2_base(0.0),
            "every layer dropped": add_stochastic_depth(wav2vec2_base(rate), "uniform", 0.0, seed=0),
        }
        counters = {name: _count_layers(model) for name, model in variants.items()}
        optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-4) for name, m in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in variants}
        layers: dict[str, list[int]] = {name: [] for name in variants}
        order = list(variants)
        shuffler = random.Random(0)
        for round_index in range(args.warmup + args.rounds):
            shuffler.shuffle(order)
            for name in order:
                model, optimizer = variants[name].train(), optimizers[name]
                set_step(model, round_index) if stochastic_depth_gates(model) else None
                counters[name][0] = 0
                start = time.process_time()
                optimizer.zero_grad(set_to_none=True)
                _loss(model, audio).backward()
                optimizer.step()
                elapsed = time.process_time() - start
                if round_index >= args.warmup:
                    times[name].append(elapsed)
                    layers[name].append(counters[name][0])
        fixed = statistics.fmean(times["every layer dropped"])
        rows = []
        for name in variants:
            mean_layers = statistics.fmean(layers[name])
            per_layer = (statistics.fmean(times[name]) - fixed) / mean_layers if mean_layers else None
            rows.append({"variant": name, "mean_step_s": statistics.fmean(times[name]), "median_step_s": statistics.median(times[name]),
                         "mean_layers_run": mean_layers, "seconds_per_layer_run": per_layer, "samples_s": times[name],
                         "layers_run": layers[name]})  # fmt: skip
        by_name = {r["variant"]: r for r in rows}
        ratio = by_name["converted"]["seconds_per_layer_run"] / by_name["transformers LayerDrop"]["seconds_per_layer_run"]
        results.append({"layerdrop": rate, "rows": rows, "per_layer_converted_to_transformers": ratio})
        print(f"\nWav2Vec2-base, layerdrop {rate}, batch {args.batch_size} x {args.seconds} s of audio, {args.rounds} rounds")
        print(f"  {'variant':26s} {'mean step s':>12s} {'layers run':>11s} {'s per layer':>12s}")
        for row in rows:
            per = row["seconds_per_layer_run"]
            print(f"  {row['variant']:26s} {row['mean_step_s']:12.3f} {row['mean_layers_run']:11.2f} {'' if per is None else f'{per:12.4f}'}")
        print(f"  time per layer run, converted / transformers: {ratio:.3f}")
    return {"results": results}


def _padded_bytes(params: list[torch.Tensor], world: int = 2) -> int:
    """Bytes FSDP2 all-gathers for `params` (float32): each padded to a multiple of `world` rows."""
    return sum(math.ceil(p.shape[0] / world) * world * p[0].numel() * 4 if p.dim() else 4 * world for p in params)


def _fsdp_worker(rank: int, tmp: str, args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    torch.set_num_threads(1)
    audio = torch.randn(args.batch_size, int(args.seconds * SAMPLE_RATE), generator=torch.Generator().manual_seed(rank))
    result = {}
    for rate in RATES:
        plain = wav2vec2_base(rate).train()
        layer_bytes = [_padded_bytes(list(layer.parameters())) for layer in plain.wav2vec2.encoder.layers]
        for layer in plain.wav2vec2.encoder.layers:
            fully_shard(layer)
        fully_shard(plain)
        plain.wav2vec2.encoder._is_fsdp_managed_module = True  # what transformers reads to keep processes in step
        recipe = fully_shard_stochastic_depth(add_stochastic_depth(wav2vec2_base(rate), seed=0).train())
        counter = _count_layers(plain)
        rows = {"transformers LayerDrop under FSDP2": [], "recipe": [], "expected recipe": [], "layers run by transformers": []}
        for step in range(args.rounds):
            for name, model in (("transformers LayerDrop under FSDP2", plain), ("recipe", recipe)):
                if name == "recipe":
                    set_step(model, step)
                counter[0] = 0
                dist.barrier()
                with collective_bytes() as sent:
                    _loss(model, audio).backward()
                model.zero_grad(set_to_none=True)
                rows[name].append(sent.all_gathered)
                if name == "recipe":
                    dropped = [not bool(g.last_active) for g in stochastic_depth_gates(model)]
                    rows["expected recipe"].append(rows["transformers LayerDrop under FSDP2"][-1]
                                                   - 2 * sum(b for b, d in zip(layer_bytes, dropped) if d))  # fmt: skip
                else:
                    rows["layers run by transformers"].append(counter[0])
        result[str(rate)] = rows
    torch.save(result, f"{tmp}/{rank}.pt")
    dist.destroy_process_group()


def fsdp_part(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_fsdp_worker, args=(tmp, args), nprocs=2, start_method="spawn")
        rows = torch.load(f"{tmp}/0.pt")
    results = []
    print(f"\nWav2Vec2-base under FSDP2, 2 gloo processes, batch {args.batch_size} x {args.seconds} s per process, {args.rounds} steps")
    print("| layerdrop | transformers: MB all-gathered per step (layers run) | recipe: MB per step | recipe / transformers | expected |")
    print("|---|---:|---:|---:|---:|")
    for rate in RATES:
        r = rows[str(rate)]
        hf, recipe, expected = (statistics.fmean(r[k]) for k in ("transformers LayerDrop under FSDP2", "recipe", "expected recipe"))
        results.append({"layerdrop": rate, "per_step": r, "transformers_bytes": hf, "recipe_bytes": recipe,
                        "recipe_to_transformers": recipe / hf, "expected_to_transformers": expected / hf})  # fmt: skip
        print(f"| {rate} | {hf / 1e6:.1f} ({statistics.fmean(r['layers run by transformers']):.1f} of 12) | {recipe / 1e6:.1f} | "
              f"{recipe / hf:.3f} | {expected / hf:.3f} |")  # fmt: skip
    return {"results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["time", "fsdp"], required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=1.0, help="of audio per sample, at 16 kHz")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.time()
    report = time_part(args) if args.part == "time" else fsdp_part(args)
    report |= {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "device": "cpu",
               "device_name": platform.processor() or platform.machine(), "wall_s": time.time() - started}  # fmt: skip
    out = args.out or ROOT / "benchmarks" / "results" / f"layer_drop_{args.part}-cpu.json"
    write_json_atomically(out, report, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
