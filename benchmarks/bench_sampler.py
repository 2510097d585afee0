"""Batches per second: utils.BatchSampler against torchvision's MNIST dataset + DataLoader.

Reads only the vendored files (torchvision's ``MNIST/raw`` layout is built in a temporary
folder from them), prints a table and writes it as JSON. For scale it also times one
training step (forward, backward, Adam) of a small CNN on the same batch size.

    .venv/bin/python -m benchmarks.bench_sampler [--device cpu] [--seconds 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import ToTensor

import utils
from atomic_files import write_json_atomically
from mnist import VENDORED_MNIST
from training import synchronize

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def batches_per_second(batches: Batches, seconds: float, device: torch.device) -> float:
    """Draw batches for about `seconds` after one warm-up batch (worker start, first shuffle)."""
    next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(batches)
        count += 1
    synchronize(device)
    return count / (time.perf_counter() - start)


def dataloader_batches(
    dataset: torchvision.datasets.MNIST, batch_size: int, workers: int, device: torch.device
) -> Batches:
    loader = DataLoader(dataset, batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda")
    for images, labels in itertools.chain.from_iterable(itertools.repeat(loader)):
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def training_steps(batch_size: int, device: torch.device) -> Batches:
    """One Adam step of a small two-conv CNN per item: what the sampler's cost compares to."""
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, 10),
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters())
    images = torch.rand(batch_size, 1, 28, 28, device=device)
    labels = torch.randint(10, (batch_size,), device=device)
    while True:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        yield images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per measurement")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 400])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sampler.json")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as root:
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for gz in VENDORED_MNIST.glob("*-ubyte.gz"):
            (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
        dataset = torchvision.datasets.MNIST(root, train=True, transform=ToTensor(), download=False)
        train, _ = utils.load_mnist()

        rows = []
        for batch_size in args.batch_sizes:
            candidates = {
                "utils.BatchSampler": lambda b=batch_size: utils.BatchSampler(train.images, train.labels, b, device=device),
                "DataLoader, 0 workers": lambda b=batch_size: dataloader_batches(dataset, b, 0, device),
                "DataLoader, 2 workers": lambda b=batch_size: dataloader_batches(dataset, b, 2, device),
                "(one training step, small CNN)": lambda b=batch_size: training_steps(b, device),
            }
            for name, make_batches in candidates.items():
                batches = iter(make_batches())
                rate = batches_per_second(batches, args.seconds, device)
                del batches  # the last reference: DataLoader workers stop now, not during the next measurement
                rows.append({"loader": name, "batch_size": batch_size, "batches_per_s": rate,
                             "samples_per_s": rate * batch_size, "ms_per_batch": 1000 / rate})

    print(f"{'loader':32} {'batch':>5} {'batches/s':>10} {'samples/s':>11} {'ms/batch':>9}")
    for row in rows:
        print(f"{row['loader']:32} {row['batch_size']:>5} {row['batches_per_s']:>10.1f} "
              f"{row['samples_per_s']:>11.0f} {row['ms_per_batch']:>9.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.out, {
        "device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "seconds_per_measurement": args.seconds, "rows": rows,
    }, indent=1)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
