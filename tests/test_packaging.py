"""The installable library: what `pip install .` puts into site-packages, and that it imports from anywhere."""

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
    assert {Path(n).name for n in names if n.startswith("stochastic_depth/")} == {
        "__init__.py", "compilation.py", "counting.py", "evaluation_network.py", "library_blocks.py",
    }


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


def test_names_that_moved_to_the_package_still_import_with_a_warning():
    import resnet_with_stochastic_depth
    from stochastic_depth import compilation, counting

    with pytest.warns(DeprecationWarning, match="stochastic_depth.compilation"):
        from resnet_with_stochastic_depth import compile_branches
    assert compile_branches is compilation.compile_branches
    with pytest.warns(DeprecationWarning, match="stochastic_depth.counting"):
        assert resnet_with_stochastic_depth.training_flop_floor is counting.training_flop_floor
    with pytest.raises(AttributeError, match="no attribute 'compile_branch'"):
        resnet_with_stochastic_depth.compile_branch
