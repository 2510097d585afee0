"""train.py and image_data.py: the paper's recipe on a fake CIFAR-10 in torchvision's format, resume,
errors, augmentation, and DDP with two CPU processes (in-process with mp.spawn, and through torchrun)."""

import json
import os
import pickle
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

import image_data
import train
from resnet_with_stochastic_depth import StochasticResNet, stochastic_depth_state

ROOT = Path(__file__).resolve().parents[1]


def write_fake_cifar10(root: Path, per_batch: int = 20, n_test: int = 20, seed: int = 0) -> Path:
    """CIFAR-10's on-disk format (cifar-10-batches-py pickles) with random images, in `root`."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)

    def dump(name, n):
        entry = {
            "data": torch.randint(0, 256, (n, 3 * 32 * 32), generator=g, dtype=torch.uint8).numpy(),
            "labels": torch.randint(0, 10, (n,), generator=g).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(entry))

    for i in range(1, 6):
        dump(f"data_batch_{i}", per_batch)
    dump("test_batch", n_test)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    return root


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    # The fake files cannot have the real MD5 sums that torchvision checks; everything else is its code.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    return write_fake_cifar10(tmp_path / "data")


def cifar_argv(data_dir, out, *extra):
    # 100 training images: 80 to train (3 batches of 32, 32, 16), 20 to validate; 20 to test.
    return ["--dataset", "cifar10", "--data-dir", str(data_dir), "--no-download", "--val-size", "20",
            "--depth", "8", "--batch-size", "32", "--output-dir", str(out), "--no-progress", *extra]  # fmt: skip


def without_times(records):
    return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in records]


# ---------------------------------------------------------------------------------- data


def test_fake_cifar_is_split_45k_5k_style_and_normalised_as_the_official_code(fake_cifar):
    splits = image_data.load_splits("cifar10", fake_cifar, val_size=20, seed=3, download=False)
    assert splits.train.images.shape == (80, 3, 32, 32) and splits.train.images.dtype == torch.uint8
    assert len(splits.val.labels) == 20 and len(splits.test.labels) == 20 and splits.num_classes == 10
    original = torchvision.datasets.CIFAR10(fake_cifar, train=True)
    everything = torch.from_numpy(original.data).permute(0, 3, 1, 2)
    together = torch.cat([splits.train.images, splits.val.images])
    # The split is a permutation of the 100 training images: same multiset of rows, none in both parts.
    key = lambda images: sorted(map(bytes, images.reshape(len(images), -1).numpy()))  # noqa: E731
    assert key(together) == key(everything)
    assert not set(key(splits.train.images)) & set(key(splits.val.images))
    mean_image, std = image_data.normalisation(splits.train)
    torch.testing.assert_close(mean_image, splits.train.images.double().mean(0).float())
    assert std == pytest.approx(splits.train.images.double().std().item(), rel=1e-2)
    normalised = image_data.Preprocess(mean_image, std)(splits.train.images)
    torch.testing.assert_close(normalised.mean(0), torch.zeros(3, 32, 32), atol=1e-4, rtol=0)


def test_svhn_validation_takes_a_fixed_number_of_images_per_class():
    labels = torch.arange(10).repeat_interleave(30)
    pool = image_data.LabelledImages(torch.arange(300).reshape(300, 1, 1, 1), labels)
    train_part, val = image_data._per_class_split(pool, 4, torch.Generator().manual_seed(0))
    assert torch.equal(val.labels.bincount(), torch.full((10,), 4))
    assert sorted(torch.cat([train_part.images, val.images]).flatten().tolist()) == list(range(300))


def test_missing_dataset_offline_says_how_to_get_it(tmp_path):
    with pytest.raises(image_data.DatasetUnavailableError, match=r"cifar-100-python\.tar\.gz.*--no-download"):
        image_data.load_splits("cifar100", tmp_path, download=False)


def test_failed_download_says_how_to_get_the_data(tmp_path, monkeypatch):
    def no_network(self):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    with pytest.raises(image_data.DatasetUnavailableError, match=r"could not be downloaded \(URLError.*cifar-10-python"):
        image_data.load_splits("cifar10", tmp_path, download=True)


def test_translation_and_flip_match_a_hand_built_reference():
    images = torch.randn(64, 2, 6, 7)
    out = image_data.random_translate_flip(images, 2, True, torch.Generator().manual_seed(0))

    def shifted(image, dy, dx, flip):
        reference = torch.zeros_like(image)
        for i in range(image.shape[1]):
            for j in range(image.shape[2]):
                if 0 <= i - dy < image.shape[1] and 0 <= j - dx < image.shape[2]:
                    reference[:, i, j] = image[:, i - dy, j - dx]
        return reference.flip(2) if flip else reference

    found = []
    for image, result in zip(images, out):
        matches = [(dy, dx, f) for dy in range(-2, 3) for dx in range(-2, 3) for f in (False, True)
                   if torch.equal(result, shifted(image, dy, dx, f))]  # fmt: skip
        assert len(matches) == 1  # random pixels: exactly one shift and flip explains each output
        found.append(matches[0])
    assert len({(dy, dx) for dy, dx, _ in found}) > 15  # many of the 25 shifts occur
    assert 16 < sum(f for *_, f in found) < 48  # about half flipped


# ---------------------------------------------------------------------------------- the recipe


def test_fake_cifar_trains_with_the_recipe_and_writes_metrics_and_checkpoint_each_epoch(fake_cifar, tmp_path):
    out = tmp_path / "run"
    result = train.main(cifar_argv(fake_cifar, out, "--epochs", "2"))
    assert result.steps == 6 and len(result.records) == 2
    assert isinstance(result.model, StochasticResNet)
    metrics = json.loads((out / "metrics.json").read_text())
    # 2 epochs, milestones at 50% and 75% (floor(1.0) = floor(1.5) = 1): lr 0.1, then 0.001, as the official code.
    assert [r["lr"] for r in metrics["epochs"]] == pytest.approx([0.1, 0.001])
    # 15 epochs: as the official code, epochs 1-7 at 0.1, 8-11 at 0.01, 12-15 at 0.001; 500: after 250 and 375.
    assert train.make_optimizer(result.model, train.parse_args(["--epochs", "15"]))[1].milestones == {7: 1, 11: 1}
    assert train.make_optimizer(result.model, train.parse_args([]))[1].milestones == {250: 1, 375: 1}
    for record in metrics["epochs"]:
        assert 0 <= record["val_error"] <= 1 and 0 <= record["test_error"] <= 1
        assert 0 < record["mean_active_blocks"] <= 3  # ResNet-8 has 3 blocks
    best = min(metrics["epochs"], key=lambda r: r["val_error"])
    assert metrics["summary"]["test_error_at_best_val"] == best["test_error"]
    assert metrics["config"]["momentum"] == 0.9 and metrics["config"]["nesterov"] and metrics["config"]["weight_decay"] == 1e-4
    assert (out / "metrics.csv").read_text().count("\n") == 3
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6
    assert not list(out.glob("*.partial"))


def test_warmup_step_schedule_image_size_and_eval_every(fake_cifar, tmp_path, monkeypatch):
    seen = []  # (lr, input shape) of each optimizer step
    original = train.training_step

    def spy(network, optimizer, scaler, autocast, images, labels, set_to_none):
        seen.append((optimizer.param_groups[0]["lr"], tuple(images.shape)))
        return original(network, optimizer, scaler, autocast, images, labels, set_to_none)

    monkeypatch.setattr(train, "training_step", spy)
    out = tmp_path / "run"
    result = train.main(cifar_argv(fake_cifar, out, "--epochs", "2", "--schedule-unit", "step", "--warmup-steps", "2",
                                   "--warmup-lr", "0.01", "--image-size", "16", "--eval-every", "2"))
    # 6 steps; milestones at floor(0.5 * 6) = 3 and floor(0.75 * 6) = 4 steps; steps 0 and 1 warm up at 0.01.
    assert [lr for lr, _ in seen] == pytest.approx([0.01, 0.01, 0.1, 0.01, 0.001, 0.001])
    assert {shape[1:] for _, shape in seen} == {(3, 16, 16)}
    assert result.records[0]["val_error"] is None and result.records[0]["test_error"] is None
    assert result.records[1]["val_error"] is not None and result.summary["best_val_epoch"] == 2
    recipe = torch.load(out / "checkpoint.pt", weights_only=True)["recipe"]
    assert (recipe["warmup_steps"], recipe["warmup_lr"], recipe["image_size"], recipe["schedule_unit"]) == (2, 0.01, 16, "step")
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert (config["warmup_steps"], config["warmup_lr"]) == (2, 0.01)
    seen.clear()
    train.main(cifar_argv(fake_cifar, tmp_path / "linear", "--epochs", "2", "--schedule-unit", "step", "--warmup-steps",
                          "4", "--warmup-lr", "0.02", "--warmup-shape", "linear"))
    # From 0.02 towards the scheduled lr in 4 steps: 0.02, 0.02 + 0.08 / 4, ... (0.01 is scheduled at step 3).
    assert [lr for lr, _ in seen] == pytest.approx([0.02, 0.04, 0.06, 0.0125, 0.001, 0.001])
    with pytest.raises(ValueError, match=r"--warmup-steps 2 there, 0 here"):
        train.main(cifar_argv(fake_cifar, out, "--epochs", "2", "--schedule-unit", "step", "--image-size", "16",
                              "--eval-every", "2", "--resume"))


def test_checkpoint_from_before_the_new_options_resumes(fake_cifar, tmp_path):
    train.main(cifar_argv(fake_cifar, tmp_path, "--epochs", "2", "--max-steps", "4"))
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for name in ("image_size", "warmup_steps", "warmup_lr", "warmup_shape", "schedule_unit", "eval_every",
                 "drop_schedule", "drop_switch"):
        del checkpoint["recipe"][name]
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    # An old checkpoint's warm-up lr is the default's (--lr / 10): the same run resumes.
    assert train.main(cifar_argv(fake_cifar, tmp_path, "--epochs", "2", "--resume")).steps == 6


@pytest.mark.parametrize("option, value", [("--warmup-steps", "-1"), ("--warmup-lr", "0"), ("--image-size", "4"),
                                           ("--eval-every", "0"), ("--drop-switch", "0"), ("--drop-switch", "1"),
                                           ("--drop-switch", "nan")])
def test_bad_warmup_size_and_eval_options_are_refused_naming_the_value(option, value, capsys):
    with pytest.raises(SystemExit):
        train.parse_args([option, value])
    assert f"got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--lr", "0"), ("--lr", "nan"), ("--momentum", "-1"), ("--weight-decay", "inf")])
def test_bad_optimiser_options_are_refused_naming_the_option(option, value, capsys):
    with pytest.raises(SystemExit):
        train.parse_args([option, value])
    assert f"{option} must be" in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("schedule_unit", "steps"), ("warmup_shape", "cosine"), ("shortcut", "B"),
                                          ("survival_rule", "foo"), ("augmentation", "flip"), ("lr_milestones", 0.5),
                                          ("val_size", -3), ("drop_schedule", "sometimes")])  # fmt: skip
def test_a_recipe_built_in_code_is_checked_as_the_command_line_is(field, value):
    # regime_study, gpu_recipe and stored checkpoints build a Recipe without argparse's choices.
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')}"):
        train.Recipe(dataset="mnist", depth=8, **{field: value})


# ---------------------------------------------------------------------------------- drop schedules


def schedule_argv(data_dir, out, schedule, *extra):
    # 4 epochs of 3 steps; the switch after floor(0.5 * 12) = 6 steps; p_L = 0.1 so that blocks drop often.
    return cifar_argv(data_dir, out, "--epochs", "4", "--p-last", "0.1", "--drop-schedule", schedule,
                      "--drop-switch", "0.5", *extra)  # fmt: skip


@pytest.mark.parametrize("schedule", ["early", "late"])
def test_a_drop_schedule_drops_only_in_its_phase_and_a_resumed_run_continues_it(fake_cifar, tmp_path, schedule):
    whole = train.main(schedule_argv(fake_cifar, tmp_path / "whole", schedule), record_drops=True)
    drops = torch.stack(whole.drops)  # (12 steps, 3 blocks)
    quiet, dropping = (drops[6:], drops[:6]) if schedule == "early" else (drops[:6], drops[6:])
    assert quiet.all(), "no block may drop outside the schedule's drop phase"
    # In its drop phase the gates draw at the target rates: 18 draws at p_l = 0.7, 0.4, 0.1 drop some blocks
    # (with this seed, as any correct draw would with probability 1 - 1e-5).
    assert not dropping.all()
    # The same schedule drawn with drop_scale 1 throughout (the constant schedule) drops the same blocks in
    # the drop phase: a schedule changes which steps drop, not the draws.
    constant = torch.stack(train.main(schedule_argv(fake_cifar, tmp_path / "constant", "constant"), record_drops=True).drops)
    phase = slice(0, 6) if schedule == "early" else slice(6, 12)
    assert torch.equal(drops[phase], constant[phase])
    state = stochastic_depth_state(whole.model)
    assert state.drop_scale == (0.0 if schedule == "early" else 1.0)  # in force at the last step
    # Stopped inside the first phase (step 4 of 12) and resumed: the same drops and records as the whole run.
    first = train.main(schedule_argv(fake_cifar, tmp_path / "parts", schedule, "--max-steps", "4"), record_drops=True)
    rest = train.main(schedule_argv(fake_cifar, tmp_path / "parts", schedule, "--resume"), record_drops=True)
    assert torch.equal(torch.stack(first.drops + rest.drops), drops)
    assert without_times(rest.records) == without_times(whole.records)
    stored = json.loads((tmp_path / "parts" / "metrics.json").read_text())["config"]
    assert (stored["drop_schedule"], stored["drop_switch"]) == (schedule, 0.5)
    with pytest.raises(ValueError, match=r"--drop-schedule .* there, 'constant' here"):
        train.main(schedule_argv(fake_cifar, tmp_path / "parts", "constant", "--resume"))


@pytest.mark.parametrize("schedule, never", [("early", "drops throughout"), ("late", "drops nothing")])
def test_the_start_up_line_gives_the_switch_step_and_says_when_max_steps_stops_before_it(
        fake_cifar, tmp_path, capsys, schedule, never):
    train.main(schedule_argv(fake_cifar, tmp_path / "a", schedule, "--max-steps", "2"))
    out = capsys.readouterr().out
    # 4 epochs of 3 steps, --drop-switch 0.5: the switch is step 6 of 12.
    assert f"{schedule} drops: {'stop' if schedule == 'early' else 'start'} at step 6 of 12" in out
    assert f"--max-steps stops at step 2, before the switch at step 6: this run {never}" in out
    # Stopped inside the first epoch: what was written, and why there is no metrics.json yet.
    assert "inside the first epoch (3 steps)" in out and "checkpoint.pt written, no metrics.json yet" in out
    assert (tmp_path / "a" / "checkpoint.pt").is_file() and not (tmp_path / "a" / "metrics.json").exists()
    train.main(schedule_argv(fake_cifar, tmp_path / "b", schedule, "--max-steps", "7"))
    out = capsys.readouterr().out
    assert "before the switch" not in out and "stopped after step 7 of 12 (--max-steps), in epoch 3 of 4" in out
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "whatever --max-steps stops at" in " ".join(capsys.readouterr().out.split())


def test_after_early_drops_evaluation_runs_every_block_at_full_strength(fake_cifar, tmp_path):
    # The gates scale a residual at test time by the survival probability in force, 1 - drop_scale * (1 - p_l):
    # after an early schedule (drop_scale 0) by 1, so the trained network evaluates as a plain ResNet with its weights.
    out = tmp_path / "early"
    result = train.main(schedule_argv(fake_cifar, out, "early"))
    plain = train.build_model(train.Recipe(dataset="cifar10", depth=8, plain=True), 3, 10)
    plain.load_state_dict(result.model.state_dict())
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result.model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), plain(x), rtol=0, atol=1e-6)
        # The same weights at the default drop_scale 1 scale by p_l and compute something else.
        stochastic_depth_state(result.model).drop_scale = 1.0
        assert not torch.allclose(result.model(x), plain(x), atol=1e-3)


def test_a_drop_schedule_needs_stochastic_depth(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--plain", "--drop-schedule", "early"])
    assert "--drop-schedule early needs stochastic depth" in capsys.readouterr().err
    assert [train.drop_scale(train.Recipe(drop_schedule=s, drop_switch=0.25), step, 10) for s in ("early", "late")
            for step in (0, 1, 2, 9)] == [1, 1, 0, 0, 0, 0, 1, 1]  # switch at floor(2.5) = 2  # fmt: skip


def test_resume_inside_an_epoch_continues_exactly(fake_cifar, tmp_path):
    whole = train.main(cifar_argv(fake_cifar, tmp_path / "whole", "--epochs", "2"))
    train.main(cifar_argv(fake_cifar, tmp_path / "parts", "--epochs", "2", "--max-steps", "4"))
    resumed = train.main(cifar_argv(fake_cifar, tmp_path / "parts", "--epochs", "2", "--resume"))
    assert resumed.steps == 6
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert without_times(resumed.records) == without_times(whole.records)


def test_a_stop_at_an_epoch_end_evaluates_only_where_an_uninterrupted_run_does(fake_cifar, tmp_path):
    # With --eval-every 2 the best validation epoch is chosen among epochs 2 and 4; a --max-steps
    # stop after epoch 1 must not add an evaluation there, or the headline could change with it.
    whole = train.main(cifar_argv(fake_cifar, tmp_path / "whole", "--epochs", "4", "--eval-every", "2"))
    train.main(cifar_argv(fake_cifar, tmp_path / "parts", "--epochs", "4", "--eval-every", "2", "--max-steps", "3"))
    resumed = train.main(cifar_argv(fake_cifar, tmp_path / "parts", "--epochs", "4", "--eval-every", "2", "--resume"))
    assert [r["val_error"] is None for r in whole.records] == [True, False, True, False]
    assert without_times(resumed.records) == without_times(whole.records)


def test_resume_with_other_options_is_refused_naming_them(fake_cifar, tmp_path):
    train.main(cifar_argv(fake_cifar, tmp_path, "--epochs", "2", "--max-steps", "1"))
    with pytest.raises(ValueError, match=r"--p-last 0.5 there, 0.8 here"):
        train.main(cifar_argv(fake_cifar, tmp_path, "--epochs", "2", "--p-last", "0.8", "--resume"))
    with pytest.raises(FileExistsError, match="--resume"):
        train.main(cifar_argv(fake_cifar, tmp_path, "--epochs", "2"))


def test_nan_loss_stops_and_names_the_first_bad_step(fake_cifar, tmp_path):
    with pytest.raises(FloatingPointError, match=r"at optimizer step (\d+)") as error:
        train.main(cifar_argv(fake_cifar, tmp_path / "a", "--epochs", "3", "--lr", "1e30", "--log-every", "4"))
    bad_step = int(re.search(r"step (\d+)", str(error.value)).group(1))
    assert bad_step > 1
    # The steps before it are fine: a run stopped just before completes without error.
    train.main(cifar_argv(fake_cifar, tmp_path / "b", "--epochs", "3", "--lr", "1e30", "--max-steps", str(bad_step - 1)))


@pytest.mark.parametrize("dropped_update", ["decay", "skip"])
def test_dropped_blocks_get_weight_decay_only_in_decay_mode(fake_cifar, tmp_path, dropped_update):
    argv = cifar_argv(fake_cifar, tmp_path, "--epochs", "2", "--max-steps", "1", "--survival-rule", "uniform",
                      "--p-last", "0.3", "--dropped-update", dropped_update, "--seed", "1")  # fmt: skip
    result = train.main(argv, record_drops=True)
    args = train.parse_args(argv)
    initial = train.build_model(args, 3, 10)
    dropped = [i for i, active in enumerate(result.drops[0].tolist()) if not active]
    assert dropped, "this seed should drop a block in the first step"
    for i in dropped:
        for before, after in zip(initial.blocks[i].parameters(), result.model.blocks[i].parameters()):
            if dropped_update == "skip":
                assert torch.equal(before, after)
            else:
                assert before.count_nonzero() == 0 or not torch.equal(before, after)
                # First Nesterov step with a zero gradient: d = wd * w, buffer = d, w -= lr * (d + 0.9 * buffer).
                torch.testing.assert_close(after, before * (1 - 0.1 * 1.9 * 1e-4), atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------------- distributed


def _train_worker(rank, world_size, port, data_dir, out, results, extra=("--epochs", "2")):
    torchvision.datasets.cifar.check_integrity = lambda *args, **kwargs: True  # fake files, see fake_cifar
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    result = train.main(cifar_argv(data_dir, out, *extra), record_drops=True)
    results[rank] = {"drops": torch.stack(result.drops), "state": result.model.state_dict(), "records": result.records}


def test_two_processes_drop_the_same_blocks_and_keep_equal_parameters(fake_cifar, tmp_path):
    import torch.multiprocessing as mp
    from torch.distributed.elastic.utils.distributed import get_free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_train_worker, args=(2, get_free_port(), fake_cifar, tmp_path / "run", results), nprocs=2)
        ranks = [dict(results[0]), dict(results[1])]
    assert torch.equal(ranks[0]["drops"], ranks[1]["drops"]) and not ranks[0]["drops"].all()
    for key, value in ranks[0]["state"].items():
        if "running" not in key and "num_batches" not in key:  # BatchNorm statistics are per process
            assert torch.equal(value, ranks[1]["state"][key]), key
    assert without_times(ranks[0]["records"]) == without_times(ranks[1]["records"])  # metrics are all-reduced
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "metrics.csv", "metrics.json"]


def test_two_processes_resumed_inside_an_epoch_report_it_as_an_uninterrupted_run(fake_cifar, tmp_path):
    # Rank 0 writes the checkpoint alone: the epoch's training totals must be everyone's, counted once.
    import torch.multiprocessing as mp
    from torch.distributed.elastic.utils.distributed import get_free_port

    runs = {"straight": [("--epochs", "2")], "resumed": [("--epochs", "2", "--max-steps", "1"), ("--epochs", "2", "--resume")]}
    records = {}
    with mp.Manager() as manager:
        for name, parts in runs.items():
            results = manager.dict()
            for extra in parts:
                mp.spawn(_train_worker, args=(2, get_free_port(), fake_cifar, tmp_path / name, results, extra), nprocs=2)
            records[name] = without_times(results[0]["records"])
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == records["resumed"][-1]["step"]
    for straight, resumed in zip(records["straight"], records["resumed"], strict=True):
        assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-6)  # summed in another order
        assert {**resumed, "train_loss": None} == {**straight, "train_loss": None}


def test_torchrun_two_processes_then_resume(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "train.py", "--dataset", "mnist", "--depth", "8", "--output-dir", str(out), "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*command, "--max-steps", "3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    second = subprocess.run([*command, "--max-steps", "5", "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "stopped after step 5" in second.stdout and second.stdout.count("train.py: mnist") == 1  # rank 0 only
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 5
