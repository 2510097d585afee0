"""The benchmarks are a package run as ``python -m benchmarks.<name>`` from the repository root."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Every script of the package but its shared counters (a module of functions, no script).
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "counters"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_benchmark_imports_as_a_module_of_the_package(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.main), f"benchmarks/{name}.py has no main()"


def test_a_benchmark_runs_with_python_m_and_writes_its_table(tmp_path):
    out = tmp_path / "training_step.json"
    command = [sys.executable, "-m", "benchmarks.bench_training_step", "--batch-size", "4", "--image", "1x28",
               "--rounds", "1", "--warmup", "0", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "FLOP floor" in result.stdout and out.is_file()


def test_inductor_options_reach_every_compiled_variant_but_the_cuda_graph_one():
    from benchmarks.bench_compile_families import groups_of_variants, inductor_option

    assert inductor_option("force_layout_optimization=true") == ("force_layout_optimization", True)
    assert inductor_option("max_autotune=False") == ("max_autotune", False)
    assert inductor_option("cpp.threads=4") == ("cpp.threads", 4)
    with pytest.raises(Exception, match="KEY=VALUE"):
        inductor_option("force_layout_optimization")
    groups = groups_of_variants("inductor", torch.bfloat16, True, {"force_layout_optimization": True})
    assert [g[2].get("options") for g in groups] == [{"force_layout_optimization": True}] * 2 + [None]
    assert groups_of_variants("inductor", None, False)[0][2] == {"backend": "inductor"}


def test_converted_steps_are_compared_with_the_masking_step_of_the_same_round():
    from benchmarks import bench_compile_families as bench
    from run_statistics import paired_ratio

    def timed(*steps):
        return {"samples_s": list(steps), "warmup_s": 0.0, "error": None}

    results = {bench.MASKING_EAGER: timed(1.0, 2.0, 1.0), bench.CONVERTED_EAGER: timed(0.8, 1.7, 0.9),
               bench.MASKING_COMPILED: timed(1.0, 3.0, 1.0), bench.MASKING_UNLIMITED: timed(2.0, 1.5, 1.0),
               bench.IDIOM: timed(0.9, 1.2, 0.8), bench.REGIONAL: timed(0.9, 1.2)}  # fmt: skip
    paired = bench.paired_to_masking(results)
    assert paired[bench.CONVERTED_EAGER] == {k: paired_ratio([0.8, 1.7, 0.9], [1.0, 2.0, 1.0])[k] for k in ("mean", "ci95")}
    # the compiled reference of each round is the faster compiled masking step: 1.0, 1.5, 1.0
    assert paired[bench.IDIOM]["mean"] == pytest.approx((0.9 * 0.8 * 0.8) ** (1 / 3))
    low, high = paired[bench.IDIOM]["ci95"]
    assert low < paired[bench.IDIOM]["mean"] < high
    assert bench.REGIONAL not in paired and bench.MASKING_EAGER not in paired  # rounds that do not pair; not converted
