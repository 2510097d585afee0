"""train.py --model vit: a tiny timm ViT on the fake CIFAR-10 of test_train trains with the ViT recipe (AdamW,
cosine), resumes exactly, drops at timm's rates (and only in a drop schedule's phase), and refuses bad options."""

import json
import math
import os
from dataclasses import asdict

import pytest
import torch
import torchvision
from test_train import cifar_argv, fake_cifar, without_times  # noqa: F401  (the fixture)
from timm.models.vision_transformer import VisionTransformer

import train
from resnet_with_stochastic_depth import stochastic_depth_gates, stochastic_depth_state

# A ViT of 2 blocks, width 16, 2 heads, on 32x32 images cut into 16 patches of 8x8; DeiT's optimiser and a
# cosine schedule of 6 steps (2 epochs of 3 steps: 32, 32 and 16 images) after a warm-up of 2.
VIT = ("--model", "vit", "--vit-layers", "2", "--vit-width", "16", "--vit-heads", "2", "--vit-patch", "8",
       "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.05", "--lr-schedule", "cosine",
       "--schedule-unit", "step", "--warmup-steps", "2", "--warmup-lr", "1e-4", "--warmup-shape", "linear")  # fmt: skip


def vit_argv(data_dir, out, *extra):
    # cifar_argv's data (80 training images, 20 to validate, 20 to test) and batches, without its ResNet-8.
    return ["--dataset", "cifar10", "--data-dir", str(data_dir), "--no-download", "--val-size", "20",
            "--batch-size", "32", "--output-dir", str(out), "--no-progress", *VIT, *extra]  # fmt: skip


def test_a_tiny_vit_trains_with_adamw_and_a_cosine_schedule(fake_cifar, tmp_path, monkeypatch, capsys):  # noqa: F811
    seen = []  # the lr of each optimizer step
    original = train.training_step

    def spy(network, optimizer, *args):
        seen.append(optimizer.param_groups[0]["lr"])
        return original(network, optimizer, *args)

    monkeypatch.setattr(train, "training_step", spy)
    out = tmp_path / "run"
    result = train.main(vit_argv(fake_cifar, out, "--epochs", "2", "--drop-path-rate", "0.5"))
    assert isinstance(result.model, VisionTransformer) and result.steps == 6
    assert "ViT of 2 blocks, width 16, 2 heads, 8x8 patches" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "metrics.csv").read_text().count("\n") == 3 and (out / "checkpoint.pt").is_file()
    for record in metrics["epochs"]:
        assert math.isfinite(record["train_loss"]) and 0 <= record["test_error"] <= 1
        # Per sample: block 1 never drops, block 2 keeps round(B / 2) of B samples (16 of 32, 8 of 16) in each branch.
        assert record["mean_active_blocks"] == 1.5
    config = metrics["config"]
    assert (config["model"], config["vit_width"], config["drop_path_rate"], config["optimizer"]) == ("vit", 16, 0.5, "adamw")
    assert config["depth"] is None and config["p_last"] is None and not config["plain"]
    # Linear warm-up from 1e-4 over 2 steps, under the cosine from 1e-3 to 0 over the 6 steps.
    cosine = [0.5e-3 * (1 + math.cos(math.pi * s / 6)) for s in range(6)]
    assert seen == pytest.approx([1e-4, 1e-4 + (cosine[1] - 1e-4) / 2, *cosine[2:]])
    assert metrics["epochs"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    # DeiT's weight decay: on the weight matrices only, not on biases, norms, the position embedding, the class token.
    optimizer, _ = train.make_optimizer(result.model, train.Recipe.from_dict(config))
    assert isinstance(optimizer, torch.optim.AdamW)
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    no_decay = {name for name, p in result.model.named_parameters() if id(p) not in decay}
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.1.attn.qkv.bias", "head.bias"} <= no_decay
    assert all(name.endswith((".bias", "_embed", "_token")) or ".norm" in name or name.startswith("norm.")
               for name in no_decay), no_decay  # fmt: skip
    assert "blocks.0.attn.qkv.weight" not in no_decay and "patch_embed.proj.weight" not in no_decay


def test_the_gates_drop_at_timms_rates_and_the_plain_vit_has_none_and_the_same_weights():
    recipe = train.Recipe(dataset="cifar10", model="vit", vit_layers=4, vit_width=16, vit_heads=2, vit_patch=8,
                          drop_path_rate=0.3, seed=3)  # fmt: skip
    model = train.build_model(recipe, 3, 10)
    gates = stochastic_depth_gates(model)
    assert len(gates) == 8 and {(g.mode, g.inverted) for g in gates} == {("row_subset", True)}
    # timm's rule: block l of 4 drops with probability 0.3 * l / 3, in both its branches; the last one at --drop-path-rate.
    drop_rates = [1 - g.survival_prob for g in gates]
    assert drop_rates == pytest.approx([0.3 * (i // 2) / 3 for i in range(8)], abs=1e-7)
    assert drop_rates[-2:] == pytest.approx([0.3, 0.3], abs=1e-7)
    plain = train.build_model(train.Recipe.from_dict({**asdict(recipe), "plain": True}), 3, 10)
    assert stochastic_depth_gates(plain) == [] and isinstance(plain.blocks[-1].drop_path1, torch.nn.Identity)
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_vit_stopped_inside_an_epoch_resumes_to_the_same_parameters(fake_cifar, tmp_path):  # noqa: F811
    argv = ("--epochs", "2", "--drop-path-rate", "0.5")
    whole = train.main(vit_argv(fake_cifar, tmp_path / "whole", *argv), record_drops=True)
    first = train.main(vit_argv(fake_cifar, tmp_path / "parts", *argv, "--max-steps", "4"), record_drops=True)
    rest = train.main(vit_argv(fake_cifar, tmp_path / "parts", *argv, "--resume"), record_drops=True)
    assert rest.steps == 6
    for (name, a), b in zip(whole.model.state_dict().items(), rest.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert without_times(rest.records) == without_times(whole.records)
    # The same samples dropped at every step; each step's (4 gates, batch) kept some and dropped some.
    assert all(torch.equal(a, b) for a, b in zip(first.drops + rest.drops, whole.drops, strict=True))
    assert whole.drops[0].shape == (4, 32) and not whole.drops[0][2:].all() and whole.drops[0][:2].all()


def test_the_recipe_round_trips_through_the_checkpoint_and_other_options_are_refused(fake_cifar, tmp_path):  # noqa: F811
    argv = vit_argv(fake_cifar, tmp_path, "--epochs", "2", "--max-steps", "1", "--drop-path-rate", "0.2")
    train.main(argv)
    stored = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    recipe = train.Recipe.from_dict(vars(train.parse_args(argv)))
    assert train.Recipe.from_dict(stored["recipe"]) == recipe and stored["recipe"] == asdict(recipe)
    assert len(stored["stochastic_depth"]["seed"]) == 4  # the gates' state, for the resumed draws
    with pytest.raises(ValueError, match=r"--drop-path-rate 0.2 there, 0.1 here"):
        train.main(vit_argv(fake_cifar, tmp_path, "--epochs", "2", "--drop-path-rate", "0.1", "--resume"))


def test_a_resnet_checkpoint_from_before_the_vit_options_resumes(fake_cifar, tmp_path):  # noqa: F811
    argv = cifar_argv(fake_cifar, tmp_path, "--epochs", "2")
    train.main([*argv, "--max-steps", "4"])
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["recipe"]["p_last"] == 0.5 and checkpoint["recipe"]["vit_layers"] is None
    for name in ("model", "optimizer", "lr_schedule", *train.VIT_DEFAULTS):
        del checkpoint["recipe"][name]
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    # What it lacks takes the defaults, which are what it trained with: a ResNet, SGD, lr steps.
    assert train.Recipe.from_dict(checkpoint["recipe"]) == train.Recipe.from_dict(vars(train.parse_args(argv)))
    assert train.main([*argv, "--resume"]).steps == 6


@pytest.mark.parametrize("schedule", ["early", "late"])
def test_a_drop_schedule_zeroes_the_vits_drop_scale_outside_its_phase(fake_cifar, tmp_path, schedule):  # noqa: F811
    # 4 epochs of 3 steps, the switch after floor(0.5 * 12) = 6 steps; the last block drops half its samples.
    result = train.main(vit_argv(fake_cifar, tmp_path, "--epochs", "4", "--drop-path-rate", "0.5", "--drop-schedule",
                                 schedule, "--drop-switch", "0.5"), record_drops=True)  # fmt: skip
    all_kept = [bool(step.all()) for step in result.drops]
    assert all_kept == ([False] * 6 + [True] * 6 if schedule == "early" else [True] * 6 + [False] * 6)
    assert stochastic_depth_state(result.model).drop_scale == (0.0 if schedule == "early" else 1.0)
    records = result.records
    assert [r["mean_active_blocks"] == 2.0 for r in records] == (
        [False, False, True, True] if schedule == "early" else [True, True, False, False])  # fmt: skip


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "vit", "--vit-width", "30", "--vit-heads", "4"], "--vit-width must be divisible by --vit-heads"),
        (["--model", "vit", "--vit-patch", "5"], "--vit-patch must divide the images' side (32 pixels"),
        (["--model", "vit", "--image-size", "16", "--vit-patch", "3"], "--vit-patch must divide the images' side (16"),
        (["--model", "vit", "--vit-layers", "0"], "--vit-layers must be positive"),
        (["--model", "vit", "--vit-layers", "1"], "--vit-layers 1 has no block that drops"),
        (["--model", "vit", "--drop-path-rate", "1"], "--drop-path-rate is the last block's drop probability"),
        (["--model", "vit", "--drop-path-rate", "nan"], "--drop-path-rate is the last block's drop probability"),
        (["--model", "vit", "--depth", "20"], "--depth is an option of the other --model, got 20 with --model vit"),
        (["--model", "vit", "--p-last", "0.5"], "--p-last is an option of the other --model"),
        (["--model", "vit", "--survival-rule", "uniform"], "--survival-rule uniform is the ResNet's"),
        (["--vit-layers", "12"], "--vit-layers is an option of the other --model, got 12 with --model resnet"),
        (["--drop-path-rate", "0.1"], "--drop-path-rate is an option of the other --model"),
        (["--model", "vit", "--plain", "--drop-schedule", "late"], "not --plain (or --drop-path-rate 0)"),
        (["--model", "transformer"], "--model: invalid choice"),
        (["--optimizer", "adam"], "--optimizer: invalid choice"),
        (["--lr-schedule", "linear"], "--lr-schedule: invalid choice"),
    ],
)
def test_bad_vit_and_optimiser_options_are_refused_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("model", "vit-tiny"), ("optimizer", "lamb"), ("lr_schedule", "poly"),
                                          ("vit_heads", 3), ("drop_path_rate", -0.1)])  # fmt: skip
def test_a_vit_recipe_built_in_code_is_checked_as_the_command_line_is(field, value):
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')}"):
        train.Recipe(**{"dataset": "mnist", "model": "vit", field: value})


def test_the_resnet_defaults_are_unchanged():
    recipe = train.Recipe()
    assert (recipe.model, recipe.optimizer, recipe.lr_schedule, recipe.p_last, recipe.depth) == ("resnet", "sgd", "step", 0.5, 110)
    assert all(getattr(recipe, name) is None for name in train.VIT_DEFAULTS)
    vit = train.Recipe(model="vit")
    assert {name: getattr(vit, name) for name in train.VIT_DEFAULTS} == train.VIT_DEFAULTS and vit.depth is None


def _vit_worker(rank, world_size, port, data_dir, out, results):
    torchvision.datasets.cifar.check_integrity = lambda *args, **kwargs: True  # fake files, see fake_cifar
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    result = train.main(vit_argv(data_dir, out, "--epochs", "2", "--drop-path-rate", "0.5"), record_drops=True)
    results[rank] = {"drops": result.drops, "state": result.model.state_dict(), "records": result.records}


def test_two_processes_train_a_vit_without_searching_for_unused_parameters(fake_cifar, tmp_path):  # noqa: F811
    # Every branch runs on some samples in row_subset mode, so DDP runs with find_unused_parameters=False:
    # a parameter without a gradient would stop it ("Expected to have finished reduction").
    import torch.multiprocessing as mp
    from torch.distributed.elastic.utils.distributed import get_free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_vit_worker, args=(2, get_free_port(), fake_cifar, tmp_path / "run", results), nprocs=2)
        ranks = [dict(results[0]), dict(results[1])]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert without_times(ranks[0]["records"]) == without_times(ranks[1]["records"])
    # Each process drew its own share's samples: half of its 16 (then 8) images in the last block's branches.
    assert [d.shape for d in ranks[0]["drops"]] == [(4, 16), (4, 16), (4, 8)] * 2
    assert all(d[2:].sum(1).tolist() == [len(d[0]) // 2] * 2 for rank in ranks for d in rank["drops"])
