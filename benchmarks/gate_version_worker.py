"""One checkout's side of ``bench_gate_versions``: builds the networks with that checkout's library
and runs training steps on command, reporting each step's CPU time and activation memory.

Run by ``bench_gate_versions`` as ``python gate_version_worker.py ROOT``: ROOT (a checkout) goes
first on ``sys.path`` and this file's own checkout is removed from it, so that
``resnet_with_stochastic_depth`` and ``stochastic_depth`` are ROOT's. It uses only what every
checkout since the library's conversion of timm and torchvision models offers
(``add_stochastic_depth``, ``set_step``, ``stochastic_depth_gates``). Commands and answers are
JSON lines on stdin and stdout.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _import_library(root: str):
    sys.path[:] = [root] + [p for p in sys.path if Path(p or ".").resolve() != HERE.parents[1]]
    import resnet_with_stochastic_depth as library

    if not Path(library.__file__).resolve().is_relative_to(Path(root).resolve()):
        raise SystemExit(f"imported {library.__file__}, not from {root}")
    return library


def _counters():
    # benchmarks/counters.py of this checkout (it imports torch only), loaded by path: ROOT may not have it.
    spec = importlib.util.spec_from_file_location("bench_counters", HERE.parent / "counters.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NETWORKS = ("ResNet-50", "ViT-S/16", "ConvNeXt-T")


def build(network: str, rate: float):
    """The unconverted network with drop rate `rate` (a masking drop path where it is > 0)."""
    import timm
    import torchvision

    if network == "ResNet-50":
        return timm.create_model("resnet50", num_classes=10, drop_path_rate=rate)
    if network == "ViT-S/16":
        return timm.create_model("vit_small_patch16_224", img_size=64, num_classes=10, drop_path_rate=rate)
    if network == "ConvNeXt-T":
        return torchvision.models.convnext_tiny(num_classes=10, stochastic_depth_prob=rate)
    raise ValueError(network)


def main() -> None:
    library = _import_library(sys.argv[1])
    counters = _counters()
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    models, optimizers = {}, {}
    x = y = None
    for line in sys.stdin:
        command = json.loads(line)
        kind = command["command"]
        if kind == "setup":
            torch.manual_seed(0)
            x = torch.randn(command["batch"], 3, command["size"], command["size"])
            y = torch.randint(10, (command["batch"],))
            answer = {"torch": torch.__version__, "library": library.__file__}
        elif kind == "build":
            key, network, variant = command["key"], command["network"], command["variant"]
            torch.manual_seed(0)
            model = build(network, 0.0 if variant == "plain" else command["rate"])
            if variant.startswith("converted"):
                library.add_stochastic_depth(model, mode=command["mode"], seed=0)
            models[key] = model.train()
            optimizers[key] = torch.optim.SGD(model.parameters(), lr=1e-3)
            answer = {"gates": len(library.stochastic_depth_gates(model))}
        elif kind == "step":
            model, optimizer = models[command["key"]], optimizers[command["key"]]
            if library.stochastic_depth_gates(model):
                library.set_step(model, command["step"])
            start = time.process_time()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            answer = {"cpu_s": time.process_time() - start}
        elif kind == "memory":
            answer = memory(library, counters, models[command["key"]], x, y, command["step"])
        else:
            raise SystemExit(f"unknown command {kind!r}")
        print(json.dumps(answer), flush=True)


def memory(library, counters, model, x, y, step: int) -> dict:
    """Saved-for-backward bytes of one training step at `step`, and for a converted model what the
    kept branches alone would save: the bytes with every branch kept, less each branch's bytes
    times the fraction of the batch its gate dropped in the measured step."""
    gates = library.stochastic_depth_gates(model)
    if not gates:
        return {"bytes": counters.saved_tensor_bytes(model, x, y)}
    measured = counters.saved_tensor_bytes(model, x, y, lambda: library.set_step(model, step))
    kept = [float(g.last_active.float().mean()) for g in gates]
    # Every branch kept (drop_scale 0), each storage filed under the gate whose branch saved it first.
    scales = [g.drop_scale for g in gates]
    for g in gates:
        g.drop_scale = 0.0
    import torch

    inside: list[object | None] = [None]
    per_gate = {g: set() for g in gates}
    seen: set[int] = set()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in parameters and ptr not in seen:
            seen.add(ptr)
            sizes[ptr] = t.untyped_storage().nbytes()
            if inside[0] is not None:
                per_gate[inside[0]].add(ptr)
        return t

    handles = []
    for g in gates:
        handles.append(g.register_forward_pre_hook(lambda m, args: inside.__setitem__(0, m)))
        handles.append(g.register_forward_hook(lambda m, args, out: inside.__setitem__(0, None)))
    import torch.nn.functional as F

    library.set_step(model, step)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    for h in handles:
        h.remove()
    for g, scale in zip(gates, scales):
        g.drop_scale = scale
    every_branch = sum(sizes.values())
    branch = [sum(sizes[p] for p in per_gate[g]) for g in gates]
    expected = every_branch - sum(b * (1 - q) for b, q in zip(branch, kept))
    return {"bytes": measured, "expected_bytes": expected, "every_branch_bytes": every_branch,
            "branch_bytes": sum(branch), "kept_fraction": sum(kept) / len(kept)}


if __name__ == "__main__":
    main()
