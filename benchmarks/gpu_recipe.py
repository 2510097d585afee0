"""The paper's recipe on a GPU: ResNet-110 epoch time, plain vs stochastic, and a real Fashion-MNIST run.

Three parts, each written to ``OUT/gpu_recipe.json`` as soon as it finishes (a part that fails
records its error and the next one runs):

1. ``epoch_time``: one epoch of the CIFAR recipe's training (352 steps of 128 images drawn
   from 45,000 random 3x32x32 images kept on the GPU, shifted and flipped there, SGD with
   Nesterov momentum and weight decay) for ResNet-110 plain and with stochastic depth
   (p_L = 0.5), after a warm-up, one after the other; beside their ratio, the FLOP floor of the
   stochastic step and the paper's own figures (about 75 s and 60 s on a TITAN X).
2. ``formats``: median step time of the stochastic ResNet-110 in float32 NCHW, float32
   channels_last and bf16-autocast channels_last (whether ``train.py``'s defaults help).
3. ``fashion_mnist``: ``train.py`` itself, ResNet-56 plain and stochastic, on Fashion-MNIST
   (55,000 / 5,000 / 10,000), the recipe with lr drops at 50% and 75% of a short schedule whose
   length is chosen from a measured step time to fit the time budget (at most 15 epochs).
   Each run's ``metrics.json`` and ``metrics.csv`` are copied to ``OUT/<run name>/``.

Usage::

    python -m benchmarks.gpu_recipe OUT [--budget-s 125] [--fashion-mnist-dir DIR]
    python -m benchmarks.gpu_recipe /tmp/out --device cpu --quick     # a tiny check of the script
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

import image_data
import train
from atomic_files import write_json_atomically, write_text_atomically
from stochastic_depth.counting import training_flop_floor
from training import BatchSampler

ROOT = Path(__file__).resolve().parents[1]

PAPER_TITAN_X_EPOCH_S = {"plain": 75.0, "stochastic": 60.0}  # Huang et al., Section 4, ResNet-110 on CIFAR-10


class Recipe:
    """Model, optimiser and one training step of ``train.py``, for a synthetic batch stream."""

    def __init__(self, depth: int, plain: bool, device: torch.device, channels_last: bool, amp: str, in_channels: int = 3):
        self.recipe = train.Recipe(dataset="cifar10", depth=depth, plain=plain)
        self.model = train.build_model(self.recipe, in_channels, 10).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer, _ = train.make_optimizer(self.model, self.recipe)
        self.autocast, self.scaler = train.mixed_precision(amp, device)
        self.set_to_none = train.prepare_gradients(self.model, self.recipe.dropped_update)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, _ = train.training_step(self.model, self.optimizer, self.scaler, self.autocast, images, labels, self.set_to_none)
        return loss


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_stream(n: int, shape: tuple[int, ...], batch_size: int, device: torch.device, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    mean_image, std = image_data.normalisation(image_data.LabelledImages(images, labels))
    preprocess = image_data.Preprocess(mean_image, std, "translate-flip", channels_last)
    batches = BatchSampler(images, labels, batch_size, seed=0, device=device)
    augment = torch.Generator(device).manual_seed(0)

    def next_batch():
        x, y = batches.next_batch()
        return preprocess(x, augment), y

    return batches, next_batch


def part_epoch_time(device: torch.device, quick: bool) -> dict:
    depth, n = (20, 1024) if quick else (110, 45_000)
    channels_last = device.type == "cuda"
    batches, next_batch = synthetic_stream(n, (3, 32, 32), 128, device, channels_last)
    recipes = {name: Recipe(depth, name == "plain", device, channels_last, "none") for name in ("plain", "stochastic")}
    for recipe in recipes.values():  # warm-up: cuDNN autotuning, allocator, first drops
        for _ in range(3 if quick else 30):
            recipe.step(*next_batch())
    steps = batches.batches_per_epoch
    result = {"depth": depth, "images": n, "batch_size": 128, "steps_per_epoch": steps, "channels_last": channels_last,
              "epoch_s": {}}  # fmt: skip
    for name, recipe in recipes.items():  # one epoch each, one after the other
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = recipe.step(*next_batch())
        synchronize(device)
        result["epoch_s"][name] = time.perf_counter() - start
        assert math.isfinite(loss.item())
    result["ratio"] = result["epoch_s"]["stochastic"] / result["epoch_s"]["plain"]
    images, labels = next_batch()
    plain_model = recipes["plain"].model
    result["flop_floor"] = training_flop_floor(plain_model, images, labels, recipes["stochastic"].model.survival_probabilities)["floor"]
    result["paper_titan_x_epoch_s"] = PAPER_TITAN_X_EPOCH_S
    result["paper_ratio"] = PAPER_TITAN_X_EPOCH_S["stochastic"] / PAPER_TITAN_X_EPOCH_S["plain"]
    return result


def median_step_s(recipe: Recipe, next_batch, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        recipe.step(*next_batch())
    times = []
    for _ in range(steps):
        images, labels = next_batch()
        synchronize(device)
        start = time.perf_counter()
        recipe.step(images, labels)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def part_fashion_mnist(out: Path, device: torch.device, quick: bool, seconds_left: float, data_dir: Path | None) -> dict:
    depth = 8 if quick else 56
    if data_dir is None:
        candidates = [image_data.mnist.DEBIAN_FASHION_MNIST, ROOT / "data" / "fashion-mnist"]
        data_dir = next((c for c in candidates if c.is_dir()), None)
        if data_dir is None:
            raise FileNotFoundError(f"no Fashion-MNIST in {' or '.join(map(str, candidates))}: copy the four IDX files there")
    # Choose the schedule from the measured cost of a plain ResNet-56 step on 1x28x28 batches of 128.
    _, next_batch = synthetic_stream(2048, (1, 28, 28), 128, device, device.type == "cuda")
    probe = median_step_s(Recipe(depth, True, device, device.type == "cuda", "none", in_channels=1), next_batch, 10, 20, device)
    steps_per_epoch = math.ceil(55_000 / 128)
    # Per epoch of both runs: the plain steps, the stochastic ones (about 0.8 of them), evaluation.
    pair_epoch_s = steps_per_epoch * probe * 1.85 + 2 * 15_000 / 128 * probe / 3
    epochs = 2 if quick else max(4, min(15, int(0.9 * (seconds_left - 10) / pair_epoch_s)))
    result = {"depth": depth, "epochs": epochs, "probe_plain_step_s": probe, "estimated_pair_epoch_s": pair_epoch_s,
              "data_dir": str(data_dir), "runs": {}}  # fmt: skip
    for name in ("plain", "stochastic"):
        run_name = f"fashion-mnist-resnet{depth}-{name}"
        with tempfile.TemporaryDirectory() as scratch:
            argv = ["--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--depth", str(depth),
                    "--epochs", str(epochs), "--output-dir", scratch, "--no-progress", "--device", str(device)]  # fmt: skip
            if name == "plain":
                argv.append("--plain")
            if quick:
                argv += ["--train-subset", "512"]
            run = train.main(argv)
            (out / run_name).mkdir(exist_ok=True)
            for file in ("metrics.json", "metrics.csv"):
                shutil.copy(Path(scratch) / file, out / run_name / file)
        options = " ".join(argv[: argv.index("--output-dir")] + argv[argv.index("--no-progress") + 3 :])
        result["runs"][name] = {"command": f"python train.py {options} --output-dir results/{run_name}", **run.summary}
    return result


def part_formats(device: torch.device, quick: bool) -> dict:
    depth = 8 if quick else 110
    variants = {"fp32, NCHW": (False, "none"), "fp32, channels_last": (True, "none"), "bf16 autocast, channels_last": (True, "bf16")}
    result = {"depth": depth, "median_step_ms": {}}
    for label, (channels_last, amp) in variants.items():
        _, next_batch = synthetic_stream(2048, (3, 32, 32), 128, device, channels_last)
        recipe = Recipe(depth, False, device, channels_last, amp)  # stochastic depth, p_L = 0.5
        step_s = median_step_s(recipe, next_batch, 1 if quick else 10, 2 if quick else 30, device)
        result["median_step_ms"][label] = 1000 * step_s
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for gpu_recipe.json, table.txt and the runs' metrics")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script on a CPU")
    parser.add_argument("--budget-s", type=float, default=125.0,
                        help="seconds (after the imports) to fit everything into; the Fashion-MNIST schedule adapts")
    parser.add_argument("--fashion-mnist-dir", type=Path, help="default: Debian's folder, else data/fashion-mnist")
    args = parser.parse_args()
    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "quick": args.quick, "budget_s": args.budget_s,
    }  # fmt: skip

    def save():
        report["elapsed_s"] = time.perf_counter() - start
        write_json_atomically(args.out / "gpu_recipe.json", report, indent=1)

    parts = [
        ("epoch_time", lambda: part_epoch_time(device, args.quick)),
        ("formats", lambda: part_formats(device, args.quick)),
        ("fashion_mnist", lambda: part_fashion_mnist(args.out, device, args.quick, args.budget_s - (time.perf_counter() - start), args.fashion_mnist_dir)),
    ]  # fmt: skip
    for name, run in parts:
        part_start = time.perf_counter()
        try:
            report[name] = run()
        except Exception as error:  # record it and go on with the next part
            report[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        report[name]["part_s"] = time.perf_counter() - part_start
        save()
        print(f"[{time.perf_counter() - start:6.1f} s] {name}: done", flush=True)

    table = format_table(report)
    write_text_atomically(args.out / "table.txt", table)
    print(table)


def format_table(report: dict) -> str:
    lines = [f"device: {report['device']}, torch {report['torch']}, {report.get('elapsed_s', 0):.0f} s in all"]
    e = report.get("epoch_time", {})
    if "epoch_s" in e:
        lines += [
            f"\nResNet-{e['depth']}, one epoch of {e['steps_per_epoch']} steps of {e['batch_size']} (CIFAR-shaped, in memory):",
            "| network | epoch s | / plain | paper, TITAN X: s |",
            "|---|---:|---:|---:|",
            f"| plain | {e['epoch_s']['plain']:.2f} | 1.000 | {e['paper_titan_x_epoch_s']['plain']:.0f} |",
            f"| stochastic depth, p_L = 0.5 | {e['epoch_s']['stochastic']:.2f} | {e['ratio']:.3f} | "
            f"{e['paper_titan_x_epoch_s']['stochastic']:.0f} ({e['paper_ratio']:.3f}) |",
            f"FLOP floor of the stochastic step: {e['flop_floor']:.3f}",
        ]
    elif e:
        lines.append(f"epoch_time failed: {e.get('error')}")
    f = report.get("fashion_mnist", {})
    if "runs" in f:
        lines += [f"\nFashion-MNIST, ResNet-{f['depth']}, {f['epochs']} epochs through train.py:",
                  "| network | test error at best val | final test error | median epoch s |", "|---|---:|---:|---:|"]  # fmt: skip
        for name, run in f["runs"].items():
            lines.append(f"| {name} | {100 * run['test_error_at_best_val']:.2f}% | {100 * run['final_test_error']:.2f}% | "
                         f"{run['median_epoch_time_s']:.2f} |")  # fmt: skip
    elif f:
        lines.append(f"fashion_mnist failed: {f.get('error')}")
    m = report.get("formats", {})
    if "median_step_ms" in m:
        lines += [f"\nStochastic ResNet-{m['depth']} (p_L = 0.5), median training step:", "| variant | ms |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in m["median_step_ms"].items()]
    elif m:
        lines.append(f"formats: {m.get('error') or m.get('skipped')}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
