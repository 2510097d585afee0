"""StochasticDepthCallback in a real transformers.Trainer: the drops of each optimizer step are what
set_step(model, global_step) draws, a run resumed from a Trainer checkpoint draws (and trains) what the
uninterrupted run did, also for a model whose new seed differs, micro-batches of one step share its key
unless per_micro_batch=True, and a model without gates is refused at the start of training."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from stochastic_depth import add_stochastic_depth, set_step, stochastic_depth_gates

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from stochastic_depth.trainer_callback import StochasticDepthCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4


# ---------------------------------------------------------------------------------- models and data


class Classifier(nn.Module):
    """What the Trainer trains: ``forward(pixel_values, labels)`` returns ``{"loss", "logits"}``."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, pixel_values, labels=None):
        logits = self.network(pixel_values)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def timm_vit(seed=None, mode=None, convert=True):
    """A 4-block timm ViT (8 gates, drop rates 0 to 0.5) on 3x16x16 images, 3 classes."""
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=3, drop_path_rate=0.5)
    if convert:
        add_stochastic_depth(vit, seed=seed, mode=mode)
    return Classifier(vit)


def convnext(seed=None, mode=None, convert=True):
    """A transformers ConvNextForImageClassification, 2 stages of 4 layers (8 gates, rates 0 to 0.5), 3 classes.

    (Not DINOv2: transformers 5.25's Trainer resumes a DINOv2 without its attention weights, converted
    or not: it saves them under their old names and loads them as unexpected keys.)"""
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[4, 4], num_stages=2, num_labels=3,
                                         drop_path_rate=0.5)  # fmt: skip
    model = transformers.ConvNextForImageClassification(config)
    return add_stochastic_depth(model, seed=seed, mode=mode) if convert else model


# Each builder: (seed=None, mode=None, convert=True) -> a Trainer model taking `pixel_values` (B, 3, 16, 16)
# and `labels` in [0, 3).
BUILDERS = [pytest.param(timm_vit, id="timm-vit"), pytest.param(convnext, id="transformers-convnext")]


def dataset(size=24):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(size, 3, 16, 16, generator=generator)
    labels = torch.randint(3, (size,), generator=generator)
    return [{"pixel_values": image, "labels": int(label)} for image, label in zip(images, labels)]


# ---------------------------------------------------------------------------------- a Trainer that records the drops


def decisions(model):
    """Each gate's last decision: a bool per sample (row modes) or one bool (batch mode)."""
    return [gate.last_active.tolist() for gate in stochastic_depth_gates(model)]


class RecordDrops(transformers.TrainerCallback):
    """Reads the gates' decisions after each micro-batch's forward and backward (nothing added to the model):
    ``drops[global_step]`` is the list of the step's micro-batches' decisions."""

    def __init__(self):
        self.drops = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step
        self.drops[self.step] = []

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self.drops[self.step].append(decisions(model))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # after the step's last micro-batch
        self.drops[self.step].append(decisions(model))


def train(model, output_dir, callback=None, resume_from=None, max_steps=6, **options):
    """Trains `model` on `dataset()` for `max_steps` optimizer steps; returns the recorded drops and the Trainer."""
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=BATCH, learning_rate=1e-3,
        save_strategy="steps", save_steps=options.pop("save_steps", max_steps), report_to=[], use_cpu=True,
        seed=0, logging_steps=1000, disable_tqdm=True, dataloader_num_workers=0, **options,
    )
    record = RecordDrops()
    callbacks = [callback or StochasticDepthCallback(), record]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    return record.drops, trainer


def expected_drops(build, seed, mode, steps, micro_batches, per_micro_batch=False):
    """What set_step says: the drops of micro-batch i of step s are those of a twin (the same seed), keyed by
    ``set_step(twin, s)`` and running its (i + 1)-th training pass (``set_step(twin, s, i)``, its first, with
    `per_micro_batch`). The twin's weights and inputs play no part in the draws, only the batch size."""
    twin = build(seed=seed, mode=mode).train()
    x, y = torch.randn(BATCH, 3, 16, 16), torch.zeros(BATCH, dtype=torch.long)
    expected = {}
    with torch.no_grad():
        for step in steps:
            expected[step] = []
            for i in range(micro_batches):
                if per_micro_batch:
                    set_step(twin, step, i)
                    twin(x, y)
                else:
                    set_step(twin, step)
                    for _ in range(i + 1):
                        twin(x, y)
                expected[step].append(decisions(twin))
    return expected


def seeds(model):
    return [gate.seed for gate in stochastic_depth_gates(model)]


# ---------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("mode", ["batch", None], ids=["batch", "converted-default"])
@pytest.mark.parametrize("build", BUILDERS)
def test_each_step_drops_what_set_step_with_the_global_step_draws(build, mode, tmp_path):
    torch.manual_seed(0)
    model = build(seed=7, mode=mode)
    drops, trainer = train(model, tmp_path)
    assert list(drops) == list(range(6))
    assert drops == expected_drops(build, 7, mode, range(6), micro_batches=1)
    assert len({json.dumps(d) for d in drops.values()}) > 1, "every step dropped alike: the test shows nothing"
    assert [gate.step for gate in stochastic_depth_gates(model)] == [(5,)] * 8  # the last step's key


@pytest.mark.parametrize("restore_callback_states", [False, True], ids=["default", "restore_callback_states"])
@pytest.mark.parametrize("build", BUILDERS)
def test_a_resumed_run_drops_and_trains_as_the_uninterrupted_run(build, restore_callback_states, tmp_path):
    options = {"save_steps": 3, "restore_callback_states_from_checkpoint": restore_callback_states}
    torch.manual_seed(0)
    model = build(seed=None)  # a random seed, which only the checkpoint remembers
    whole_drops, _ = train(model, tmp_path / "whole", **options)
    saved = json.loads((tmp_path / "whole" / "checkpoint-3" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["StochasticDepthCallback"]["gates"]["seed"] == seeds(model)

    torch.manual_seed(1)
    fresh = build(seed=None)
    assert seeds(fresh) != seeds(model)
    resumed_drops, trainer = train(fresh, tmp_path / "resumed", resume_from=tmp_path / "whole" / "checkpoint-3", **options)
    assert seeds(fresh) == seeds(model)
    assert resumed_drops == {step: whole_drops[step] for step in range(3, 6)}
    assert len({json.dumps(d) for d in resumed_drops.values()}) > 1, "every step dropped alike: the test shows nothing"
    whole, resumed = model.state_dict(), fresh.state_dict()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6, msg=name)
    # With restore_callback_states_from_checkpoint the Trainer replaces the callback by one built from the checkpoint.
    (callback,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StochasticDepthCallback)]
    assert callback.per_micro_batch is False


@pytest.mark.parametrize("build", BUILDERS)
def test_a_resume_from_a_checkpoint_without_the_gates_state_warns_for_a_random_seed_and_saves_it(build, tmp_path):
    torch.manual_seed(0)
    plain = transformers.TrainerCallback()  # a run without StochasticDepthCallback saves no gate state
    train(build(seed=None), tmp_path / "whole", callback=plain, max_steps=2, save_steps=1)
    model = build(seed=None)
    with pytest.warns(UserWarning, match="without the gates' state.*seed=None"):
        train(model, tmp_path / "resumed", resume_from=tmp_path / "whole" / "checkpoint-1", max_steps=2, save_steps=1)
    # The Trainer alone would raise KeyError at this save (a stateful callback missing from the resumed state).
    saved = json.loads((tmp_path / "resumed" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["StochasticDepthCallback"]["gates"]["seed"] == seeds(model)


@pytest.mark.parametrize(
    ("mode", "per_micro_batch"),
    [("batch", False), ("batch", True), (None, False), (None, True)],
    ids=["batch", "batch-per-micro-batch", "converted-default", "converted-default-per-micro-batch"],
)
@pytest.mark.parametrize("build", BUILDERS)
def test_gradient_accumulation_keys_micro_batches_by_the_step_or_each_its_own(build, mode, per_micro_batch, tmp_path):
    torch.manual_seed(0)
    model = build(seed=3, mode=mode)
    callback = StochasticDepthCallback(per_micro_batch=per_micro_batch)
    drops, _ = train(model, tmp_path, callback=callback, max_steps=3, gradient_accumulation_steps=2)
    assert list(drops) == [0, 1, 2] and all(len(micro) == 2 for micro in drops.values())
    assert drops == expected_drops(build, 3, mode, range(3), micro_batches=2, per_micro_batch=per_micro_batch)
    shared = [micro[0] == micro[1] for micro in drops.values()]
    if mode == "batch" and not per_micro_batch:
        assert all(shared)  # one sub-network per optimizer step, as one mini-batch in the paper
    else:
        assert not all(shared)  # each micro-batch its own draw


@pytest.mark.parametrize("build", BUILDERS)
def test_a_model_without_gates_is_refused_when_training_begins(build, tmp_path):
    with pytest.raises(TypeError, match=r"no StochasticDepth gates.*add_stochastic_depth\(model"):
        train(build(convert=False), tmp_path)


def test_per_micro_batch_must_be_a_bool():
    with pytest.raises(TypeError, match="per_micro_batch"):
        StochasticDepthCallback(per_micro_batch="yes")


def test_the_package_does_not_import_transformers_and_the_module_says_what_to_install():
    script = (
        "import sys\n"
        "import stochastic_depth, stochastic_depth.conversion, stochastic_depth.library_blocks\n"
        "print('transformers' in sys.modules)\n"
        "sys.modules['transformers'] = None  # as if not installed\n"
        "try:\n"
        "    import stochastic_depth.trainer_callback\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    imported, message = result.stdout.splitlines()
    assert imported == "False"
    assert "pip install" in message and "transformers" in message and "accelerate" in message
