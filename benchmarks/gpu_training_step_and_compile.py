"""The training step and compilation on a CUDA GPU, in one run of about three minutes on an H100.

1. ``tests/test_cuda.py``, whose output goes to ``OUT_DIR/test_cuda.txt``.
2. The training-step table of ``bench_training_step.py`` (every variant, row_subset
   included, with operators per step), median of 30 steps, on MNIST-sized images
   (128x1x28x28), where a GPU step is bound by kernel launches.
3. The same table on ImageNet-sized images (64x3x224x224), where it is bound by
   arithmetic: the size at which running branches on fewer samples can pay on a GPU.
4. Compiled (``compile_branches``, inductor) against eager training steps
   (``bench_compile.py``): first ResNet-50 (batch 128x1x28x28) in row_subset mode with
   ``mode="reduce-overhead"``, whose CUDA graphs remove the launches that bound an eager
   step at this size; then, if time is left, default compilation of a CIFAR ResNet-110
   (batch 128x3x32x32) and ResNet-50 in batch mode (measured before on an H100).

Each part is written to ``OUT_DIR`` as soon as it finishes (``training_step.json``,
``training_step-3x224.json``, ``compile-<network>[-<modes>].json``) and a failing part is
reported and skipped, so the run always completes; parts that would start after
``--budget-s`` seconds are skipped. Everything printed is also written to
``OUT_DIR/summary.txt``.

Usage::

    python -m benchmarks.gpu_training_step_and_compile OUT_DIR              # on the GPU
    python -m benchmarks.gpu_training_step_and_compile OUT_DIR --device cpu --quick   # a smoke test on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from atomic_files import write_json_atomically, write_text_atomically
from benchmarks import bench_compile, bench_training_step


class Tee(io.TextIOBase):
    """Print to the terminal and keep a copy for summary.txt."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text):
        self.stream.write(text)
        self.stream.flush()
        return self.copy.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and the aot_eager backend: a smoke test")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="start no part after this many seconds (each part still runs to its end)")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    start = time.perf_counter()
    tee = Tee(sys.stdout)

    if args.quick:
        table = dict(batch_size=8, rounds=1, warmup=1)
        large_table = dict(batch_size=2, rounds=1, warmup=1, image=(3, 64, 64))
        compile_runs = [("resnet20", 4, "row_subset", None), ("resnet20", 4, "batch", None)]
        compile_options = dict(rounds=1, warmup=1, backend="aot_eager")
    else:
        table = dict(batch_size=128, rounds=30, warmup=3)
        large_table = dict(batch_size=64, rounds=30, warmup=3, image=(3, 224, 224))
        compile_runs = [("resnet50", 128, "row_subset", "reduce-overhead"),
                        ("resnet110", 128, "batch", None), ("resnet50", 128, "batch", None)]
        compile_options = dict(rounds=30, warmup=3, backend="inductor")

    def test_cuda() -> dict:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "tests/test_cuda.py"],
                               cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        write_text_atomically(args.out_dir / "test_cuda.txt", tests.stdout + tests.stderr)
        return {"returncode": tests.returncode, "last_line": tests.stdout.strip().splitlines()[-1:]}

    large = "training_step-{}x{}".format(*large_table["image"][:2])
    parts = [
        ("test_cuda", test_cuda, print),
        ("training_step", lambda: bench_training_step.run(device, **table), bench_training_step.print_table),
        (large, lambda: bench_training_step.run(device, **large_table), bench_training_step.print_table),
    ]
    for network, batch_size, drop_mode, compile_mode in compile_runs:
        name = f"compile-{network}" if drop_mode == "batch" and compile_mode is None else \
            f"compile-{network}-{drop_mode}-{compile_mode or 'default'}"
        parts.append((
            name,
            lambda network=network, batch_size=batch_size, drop_mode=drop_mode, compile_mode=compile_mode: {
                **bench_compile.environment(device),
                **bench_compile.measure(network, device, batch_size, drop_mode=drop_mode,
                                        compile_mode=compile_mode, **compile_options),
            },
            lambda result: bench_compile.print_table(result, device),
        ))

    with contextlib.redirect_stdout(tee):
        print(f"device {device}: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
              f"torch {torch.__version__}")
        for name, measure, show in parts:
            elapsed = time.perf_counter() - start
            if elapsed > args.budget_s:
                print(f"\n[{name}] skipped: {elapsed:.0f} s spent, budget {args.budget_s:.0f} s")
                continue
            part_start = time.perf_counter()
            try:
                result = measure()
                write_json_atomically(args.out_dir / f"{name}.json", result, indent=2)
                show(result)
                print(f"[{name}] done in {time.perf_counter() - part_start:.0f} s")
            except Exception:  # one failing part must not cost the others
                print(f"\n[{name}] failed after {time.perf_counter() - part_start:.0f} s:")
                traceback.print_exc(file=sys.stdout)
            write_text_atomically(args.out_dir / "summary.txt", tee.copy.getvalue())
        print(f"\ntotal {time.perf_counter() - start:.0f} s")
    write_text_atomically(args.out_dir / "summary.txt", tee.copy.getvalue())


if __name__ == "__main__":
    main()
