"""Time and measure the gates of two checkouts in one run: did a change cost speed or memory?

Two worker processes (``gate_version_worker.py``), one importing the library of ``--previous``
(a checkout: ``git worktree add /tmp/previous <commit>``), one of ``--current`` (this checkout
by default), build the same networks (timm's ResNet-50, timm's ViT-S/16 at 64x64, torchvision's
ConvNeXt-T; drop rate ``--rate``) converted with ``add_stochastic_depth`` in batch and
row_subset mode, and the current worker also builds each network unconverted (its masking drop
path) and plain (rate 0). Each round runs one SGD training step of every variant, in a shuffled
order, the two versions' steps of a network and mode back to back with the same ``set_step``
(so both draw the same drops); time is the CPU time of one thread. Reported:

- after / before: the geometric mean of the per-round ratios of the two versions' steps, with a
  95% t interval over rounds (paired);
- converted / masking and converted / plain (current version), likewise;
- activation memory: the bytes autograd saves for backward in one step (each storage once,
  parameters left out; exact on any machine), converted / masking, beside the expected fraction:
  what the kept branches alone would save.

Usage::

    python -m benchmarks.bench_gate_versions --previous /tmp/previous --out benchmarks/results/gate_versions.json
        [--current .] [--rounds 15] [--batch 8] [--size 64] [--rate 0.4]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path

from scipy import stats

from atomic_files import write_json_atomically

WORKER = Path(__file__).resolve().parent / "gate_version_worker.py"
NETWORKS = ("ResNet-50", "ViT-S/16", "ConvNeXt-T")
MODES = ("batch", "row_subset")


class Worker:
    """A worker process importing the library of one checkout."""

    def __init__(self, root: Path) -> None:
        self.process = subprocess.Popen([sys.executable, str(WORKER), str(root)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)

    def __call__(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for {command} stopped (exit {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def ratio_interval(numerators: list[float], denominators: list[float]) -> dict:
    """Geometric mean of the paired ratios and its 95% t interval."""
    logs = [math.log(a / b) for a, b in zip(numerators, denominators)]
    mean = statistics.fmean(logs)
    half = stats.t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return {"ratio": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--previous", type=Path, required=True, help="a checkout of the library to compare with")
    parser.add_argument("--current", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.4)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for root in (args.previous, args.current):
        if not (root / "resnet_with_stochastic_depth.py").is_file():
            parser.error(f"{root}: not a checkout of this library (no resnet_with_stochastic_depth.py)")

    workers = {"before": Worker(args.previous), "after": Worker(args.current)}
    setup = {name: w(command="setup", batch=args.batch, size=args.size) for name, w in workers.items()}
    variants = []  # (version, network, variant)
    for network in args.networks:
        for mode in MODES:
            for version in workers:
                variants.append((version, network, f"converted {mode}"))
        variants += [("after", network, "masking"), ("after", network, "plain")]
    for version, network, variant in variants:
        mode = variant.split()[-1] if variant.startswith("converted") else None
        workers[version](command="build", key=f"{network} {variant}", network=network, variant=variant,
                         mode=mode, rate=args.rate)

    times: dict[tuple[str, str, str], list[float]] = {v: [] for v in variants}
    groups = []  # steps run back to back: the two versions of one network and mode; masking and plain
    for network in args.networks:
        groups += [[(version, network, f"converted {mode}") for version in workers] for mode in MODES]
        groups.append([("after", network, "masking"), ("after", network, "plain")])
    shuffler = random.Random(0)
    for round_index in range(args.warmup + args.rounds):
        shuffler.shuffle(groups)
        for group in groups:
            for version, network, variant in shuffler.sample(group, len(group)):
                cpu = workers[version](command="step", key=f"{network} {variant}", step=round_index)["cpu_s"]
                if round_index >= args.warmup:
                    times[(version, network, variant)].append(cpu)
        print(f"round {round_index + 1} of {args.warmup + args.rounds}", file=sys.stderr, flush=True)

    step = args.warmup + args.rounds  # a step none of the timed ones drew
    rows = []
    for network in args.networks:
        masking, plain = times[("after", network, "masking")], times[("after", network, "plain")]
        masking_bytes = workers["after"](command="memory", key=f"{network} masking", step=step)["bytes"]
        plain_bytes = workers["after"](command="memory", key=f"{network} plain", step=step)["bytes"]
        for mode in MODES:
            variant = f"converted {mode}"
            before, after = times[("before", network, variant)], times[("after", network, variant)]
            memory = {v: workers[v](command="memory", key=f"{network} {variant}", step=step) for v in workers}
            rows.append({
                "network": network, "mode": mode,
                "after_ms": 1e3 * statistics.median(after), "before_ms": 1e3 * statistics.median(before),
                "after_over_before": ratio_interval(after, before),
                "converted_over_masking": ratio_interval(after, masking),
                "converted_over_plain": ratio_interval(after, plain),
                "masking_ms": 1e3 * statistics.median(masking), "plain_ms": 1e3 * statistics.median(plain),
                "saved_bytes": {"masking": masking_bytes, "plain": plain_bytes, "before": memory["before"]["bytes"],
                                "after": memory["after"]["bytes"], "expected": memory["after"]["expected_bytes"],
                                "kept_fraction": memory["after"]["kept_fraction"]},
            })
    for w in workers.values():
        w.close()

    print(f"Training step (SGD), batch {args.batch}x3x{args.size}x{args.size}, drop rate {args.rate}, CPU time of "
          f"1 thread, {args.rounds} paired rounds; torch {setup['after']['torch']}; 95% t intervals")
    print("| network | mode | after / before | converted / masking | converted / plain | saved bytes, converted / masking: "
          "before | after | expected |")
    print("|---|---|---|---|---|---:|---:|---:|")
    for r in rows:
        def cell(d):
            return f"{d['ratio']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"
        b = r["saved_bytes"]
        print(f"| {r['network']} | {r['mode']} | {cell(r['after_over_before'])} | {cell(r['converted_over_masking'])} | "
              f"{cell(r['converted_over_plain'])} | {b['before'] / b['masking']:.3f} | {b['after'] / b['masking']:.3f} | "
              f"{b['expected'] / b['masking']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.out, {"previous": str(args.previous), "current": str(args.current),
                                    "batch": args.batch, "size": args.size, "rate": args.rate, "rounds": args.rounds,
                                    "clock": "process", "threads": 1, "workers": setup, "rows": rows,
                                    "samples_s": {" | ".join(k): v for k, v in times.items()}}, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
