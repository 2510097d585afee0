"""The docs' code: each block marked ``<!-- tested: NAME -->`` runs here, and does what the text around it says."""

import re
from pathlib import Path

import pytest
import torch

from resnet_with_stochastic_depth import StochasticResNet, stochastic_depth_gates

ROOT = Path(__file__).resolve().parents[1]


def snippet(name, page="docs/pytorch-tools.md"):
    """The python block that follows the marker ``<!-- tested: name`` on `page`."""
    text = (ROOT / page).read_text()
    match = re.search(rf"<!-- tested: {re.escape(name)}\b.*?-->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, f"no block marked 'tested: {name}' in {page}"
    return match.group(1)


def test_seeing_the_drops():
    namespace = {}
    exec(snippet("seeing-the-drops"), namespace)
    gates = stochastic_depth_gates(namespace["model"])
    assert len(namespace["kept"]) == len(gates) == 8
    assert namespace["kept"] == [bool(g.last_active) for g in gates]
    # row_subset at batch 4: each gate kept round(4 p) of the 4 samples.
    convnext_gates = stochastic_depth_gates(namespace["convnext"])
    assert namespace["kept_share"] == [max(1, int(4 * g.survival_prob + 0.5)) / 4 for g in convnext_gates]


def _fit(classifier_class, max_steps, root, resume_from=None):
    """Train a CIFAR ResNet-14 (seed 0) with Lightning on 6 fixed images, 3 steps an epoch, saving a
    checkpoint at each epoch's end in `root`; returns the module and its drops per step."""
    pl = pytest.importorskip("pytorch_lightning")
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(6, 3, 8, 8, generator=generator), torch.randint(10, (6,), generator=generator))
    drops = []

    class RecordDrops(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            drops.append(module.model.active_blocks.tolist())

    torch.manual_seed(1)  # the initial weights (a resumed run loads the checkpoint's)
    module = classifier_class(StochasticResNet.cifar(14, p_last=0.5, seed=0))
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, callbacks=[RecordDrops(), every_epoch],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2), ckpt_path=resume_from)
    return drops


def test_lightning_set_step_makes_a_resumed_run_exact(tmp_path):
    namespace = {}
    exec(snippet("lightning"), namespace)
    classifier = namespace["Classifier"]
    whole_drops = _fit(classifier, 6, tmp_path / "whole")
    (epoch_0,) = (tmp_path / "whole").glob("epoch=0-step=3*.ckpt")
    assert "stochastic_depth" in torch.load(epoch_0, weights_only=False)
    resumed_drops = _fit(classifier, 6, tmp_path / "resumed", resume_from=epoch_0)
    # The same drops at every optimizer step after the resume. (Not the same weights: Lightning 2.6
    # feeds a resumed run's first epoch its first batch twice, whatever the model.)
    assert resumed_drops == whole_drops[3:]
    assert len({tuple(d) for d in whole_drops}) > 1, "every step dropped alike: the test shows nothing"


def test_hugging_face_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    generator = torch.Generator().manual_seed(0)
    namespace = {
        "config": transformers.Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                            image_size=16, patch_size=8, drop_path_rate=0.3, num_labels=10),
        "args": transformers.TrainingArguments(output_dir=tmp_path, max_steps=2, per_device_train_batch_size=2,
                                               report_to=[], use_cpu=True, save_strategy="no"),
        "train": [{"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": i} for i in range(4)],
    }  # fmt: skip
    exec(snippet("hugging-face-trainer", "docs/hugging-face.md"), namespace)
    assert namespace["rates"] == [0.3] * 4  # DINOv2's one rate, on both branches of both layers
    gates = stochastic_depth_gates(namespace["model"])
    assert [g.step for g in gates] == [(1,)] * 4  # the callback keyed the last step's drops
