"""The installable library: what `pip install .` puts into site-packages, and that it imports from anywhere."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# This repository's experiment modules: generic names that must not land in a user's site-packages.
EXPERIMENT_MODULES = ("utils", "training", "mnist", "image_data", "plotting", "train", "study", "regime_study", "compare_runs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy of what git tracks, so that setuptools' build/ and egg-info stay out of the checkout.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.split("\0"):
        if name and not name.startswith(("results/", "data/", "benchmarks/results/")) and (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(out), "-q"],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (path,) = out.glob("*.whl")
    return path


def test_the_wheel_holds_the_model_file_and_the_package_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"resnet_with_stochastic_depth.py", "stochastic_depth"}
    package = {path.name for path in (ROOT / "stochastic_depth").glob("*.py")}
    assert {"__init__.py", "gate.py", "library_blocks.py"} <= package
    assert {Path(n).name for n in names if n.startswith("stochastic_depth/")} == package


def test_the_wheel_carries_the_bsd_license(wheel):
    archive = zipfile.ZipFile(wheel)
    (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    assert "License-Expression: BSD-3-Clause" in archive.read(metadata).decode().splitlines()
    (license_file,) = [n for n in archive.namelist() if n.endswith("/LICENSE")]
    assert archive.read(license_file).decode().startswith("BSD 3-Clause License")


def test_installed_library_imports_from_another_folder(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "notebooks"
    elsewhere.mkdir()
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "--target", str(target), "-q"],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stderr
    script = (
        "import importlib.util, sys\n"
        f"sys.path = [p for p in sys.path if p != {str(ROOT)!r}]\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        "import torch, torchvision\n"
        "from resnet_with_stochastic_depth import StochasticResNet, add_stochastic_depth\n"
        "from stochastic_depth.compilation import compile_branches\n"
        "import resnet_with_stochastic_depth, stochastic_depth.library_blocks\n"
        "model = add_stochastic_depth(torchvision.models.resnet18(num_classes=10), seed=0)\n"
        "print(resnet_with_stochastic_depth.__file__.startswith(sys.path[0]), len(StochasticResNet.cifar(20).blocks))\n"
        f"print(*[importlib.util.find_spec(m) is not None for m in {EXPERIMENT_MODULES!r}])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    imported, found = result.stdout.splitlines()
    assert imported.split() == ["True", "9"]
    assert found.split() == ["False"] * len(EXPERIMENT_MODULES)


# The library's modules, base first: each imports only modules before it (and never the
# other way round). The package's __init__ imports the model file, whose blocks are the
# gated classes of torchvision's ResNet blocks.
IMPORT_ORDER = (
    "stochastic_depth.compilation",
    "stochastic_depth.autograd_ops",
    "stochastic_depth.gate",
    "stochastic_depth.schedules",
    "stochastic_depth.library_blocks",
    "stochastic_depth.hugging_face",
    "stochastic_depth.layer_drop",
    "stochastic_depth.conversion",
    "stochastic_depth.distributed",
    "resnet_with_stochastic_depth",
    "stochastic_depth.counting",
    "stochastic_depth.evaluation_network",
    "stochastic_depth.trainer_callback",
)
LIBRARY = ("stochastic_depth", "resnet_with_stochastic_depth")


def _library_imports(path: Path) -> tuple[set[str], list[str], list[str]]:
    """(library modules `path` imports at its top level, library imports made inside a function or
    class, underscore names it imports from a library module)."""
    tree = ast.parse(path.read_text())
    top, nested, private = set(), [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
            if names[0].split(".")[0] in LIBRARY:
                private += [f"{names[0]}.{a.name}" for a in node.names if a.name.startswith("_")]
        else:
            continue
        names = [n for n in names if n.split(".")[0] in LIBRARY]
        (top.update(names) if node in tree.body else nested.extend(names))
    return top, nested, private


def test_the_library_imports_run_one_way_and_never_from_inside_a_function():
    for position, module in enumerate(IMPORT_ORDER):
        path = ROOT / (module.replace(".", "/") + ".py")
        top, nested, _ = _library_imports(path)
        assert not nested, f"{path.name} imports {nested} inside a function or class"
        assert top <= set(IMPORT_ORDER[:position]), f"{module} imports {top - set(IMPORT_ORDER[:position])}, above it"
    package = {f"stochastic_depth.{p.stem}" for p in (ROOT / "stochastic_depth").glob("*.py") if p.stem != "__init__"}
    assert package <= set(IMPORT_ORDER), f"place {package - set(IMPORT_ORDER)} in IMPORT_ORDER"


def test_no_module_imports_another_modules_private_names():
    paths = [*ROOT.glob("*.py"), *(ROOT / "stochastic_depth").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
             *(ROOT / "tests").glob("*.py")]
    private = {str(p.relative_to(ROOT)): _library_imports(p)[2] for p in paths}
    assert {p: names for p, names in private.items() if names} == {}


def test_only_the_compilation_module_reaches_into_dynamo():
    for path in (ROOT / "stochastic_depth").glob("*.py"):
        if path.stem != "compilation":
            assert "torch._dynamo" not in path.read_text(), path.name
    assert "torch._C" not in (ROOT / "stochastic_depth" / "gate.py").read_text()


@pytest.mark.parametrize("module", [*IMPORT_ORDER, "stochastic_depth"])
def test_each_library_module_imports_first_in_a_fresh_interpreter(module):
    script = (
        f"import {module}\n"
        "from stochastic_depth import StochasticDepth, add_stochastic_depth, set_step, stochastic_depth_gates\n"
        "import torchvision\n"
        "print(len(stochastic_depth_gates(add_stochastic_depth(torchvision.models.resnet18()))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["8"]


def test_the_packages_all_lists_public_names_that_exist():
    import stochastic_depth

    assert all(not name.startswith("_") and hasattr(stochastic_depth, name) for name in stochastic_depth.__all__)


def test_the_gate_is_importable_from_the_model_file_as_before():
    import resnet_with_stochastic_depth as model_file
    from stochastic_depth import gate, schedules

    for name in gate.__all__:
        assert getattr(model_file, name) is getattr(gate, name)
    for name in schedules.__all__:
        assert getattr(model_file, name) is getattr(schedules, name)
