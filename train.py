"""Train one ResNet, plain or with stochastic depth, with the paper's recipe; or a small ViT.

The defaults are Huang et al.'s CIFAR recipe (ECCV 2016, and their official code): ResNet-110
with option-A shortcuts, linear decay to p_L = 0.5, SGD with Nesterov momentum 0.9, weight
decay 1e-4, batch 128, lr 0.1 divided by 10 after 50% and 75% of 500 epochs, shifts of up to
4 pixels and horizontal flips, a 45k/5k train/validation split, and as the result the test
error at the epoch of lowest validation error. SVHN gets the paper's SVHN recipe (ResNet-152,
50 epochs, lr drops after epochs 30 and 35, no augmentation).

``--model vit`` trains a small timm Vision Transformer instead (``--vit-layers``, ``--vit-width``,
``--vit-heads``, ``--vit-patch``), with timm's stochastic depth converted so that dropped branches
are not computed: the drop rate rises linearly from 0 at the first block to ``--drop-path-rate``
at the last (timm's and DeiT's rule), per sample (``row_subset``), and ``--plain`` means no drops.
A ViT recipe is chosen with the optimiser options: ``--optimizer adamw --weight-decay 0.05
--lr-schedule cosine`` (DeiT's; no weight decay on biases, norms, the position embedding and
the class token) and a warm-up (``--warmup-steps``, ``--warmup-shape linear``). Everything else
(the data, the files, resume, the drop schedules) is the same for both models.

Usage::

    python train.py --dataset cifar10 --output-dir runs/c10-sd        # stochastic depth
    python train.py --dataset cifar10 --plain --output-dir runs/c10   # constant depth
    python train.py --dataset cifar10 --output-dir runs/c10-sd --resume
    python train.py --dataset fashion-mnist --model vit --optimizer adamw --lr 1e-3 --weight-decay 0.05 \\
        --lr-schedule cosine --warmup-steps 200 --warmup-shape linear --output-dir runs/fm-vit-sd
    torchrun --nproc_per_node 4 train.py --dataset cifar100 --output-dir runs/c100-sd

Under ``torchrun`` every process trains a DistributedDataParallel replica on its share of
each batch (``--batch-size`` is the batch of all processes together, so the recipe does not
change with their number), all processes drop the same blocks at every step (a ViT's per-sample
drops: each process draws its own samples, at the same rates), and only rank 0
writes files and shows progress. Each epoch ``--output-dir`` gets ``metrics.json``,
``metrics.csv`` and ``checkpoint.pt`` (written atomically).

Reading order: :class:`Recipe` (what defines a run) and :func:`parse_args`; :func:`main` and
:func:`train`, the loop, which calls :func:`load_data`, :func:`build_training`,
:func:`train_epoch`, :func:`end_epoch` (evaluation and the epoch's record) and the
checkpoint and metrics functions.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import image_data
from atomic_files import write_atomically, write_json_atomically
from resnet_with_stochastic_depth import (
    StochasticDepth,
    add_stochastic_depth,
    set_step,
    stochastic_depth_gates,
    stochastic_depth_state,
)
from stochastic_depth.schedules import early_drops, late_drops
from training import (
    BatchSampler,
    build_resnet,
    predict,
    save_atomically,
    synchronize,
)  # fmt: skip

# Dataset-dependent defaults (Section 4 of the paper). MNIST-like sets get the CIFAR recipe
# without flips, which would turn some digits into others.
RECIPES: dict[str, dict[str, Any]] = {
    "cifar10": dict(depth=110, epochs=500, lr_milestones=[0.5, 0.75], augmentation="translate-flip"),
    "cifar100": dict(depth=110, epochs=500, lr_milestones=[0.5, 0.75], augmentation="translate-flip"),
    "svhn": dict(depth=152, epochs=50, lr_milestones=[0.6, 0.7], augmentation="none"),
    "mnist": dict(depth=110, epochs=500, lr_milestones=[0.5, 0.75], augmentation="translate"),
    "fashion-mnist": dict(depth=110, epochs=500, lr_milestones=[0.5, 0.75], augmentation="translate"),
}
# The ViT's shape and drops when not given (--model vit): 12 blocks as ViT-Tiny, narrow enough that a run of
# 2,064 steps of 128 images at 16x16 pixels takes about 7 minutes on one CPU thread (0.18 s a step;
# results/vit-fashion-mnist/run_all.sh), heads of 32 channels; DeiT-Tiny's drop rate (0.1 at the last block).
VIT_DEFAULTS: dict[str, Any] = dict(vit_layers=12, vit_width=64, vit_heads=2, vit_patch=4, drop_path_rate=0.1)
# The side of each dataset's images in pixels (--image-size changes it), which the ViT's patch grid needs.
IMAGE_SIZES = {"cifar10": 32, "cifar100": 32, "svhn": 32, "mnist": 28, "fashion-mnist": 28}
METRIC_COLUMNS = (
    "epoch", "step", "lr", "train_loss", "train_error", "val_loss", "val_error", "test_loss", "test_error",
    "epoch_time_s", "eval_time_s", "mean_active_blocks",
)  # fmt: skip


# ----------------------------------------------------------------------------------
# The recipe and the command line
# ----------------------------------------------------------------------------------


# The values a Recipe's text options take: checked by the command line and by Recipe alike.
CHOICES = {
    "dataset": image_data.DATASETS,
    "augmentation": ("translate-flip", "translate", "none"),
    "shortcut": ("A", "projection"),
    "survival_rule": ("linear", "uniform"),
    "schedule_unit": ("epoch", "step"),
    "warmup_shape": ("constant", "linear"),
    "dropped_update": ("decay", "skip"),
    "drop_schedule": ("constant", "early", "late"),
    "model": ("resnet", "vit"),
    "optimizer": ("sgd", "adamw"),
    "lr_schedule": ("step", "cosine"),
}


@dataclass(frozen=True)
class Recipe:
    """The options that define a run; a resumed run must have the same ones.

    Each field is the ``train.py`` option of the same name (``p_last`` is ``--p-last``) with
    the same default; see :func:`parse_args` for what each means. A default of None is filled
    in on construction: ``depth``, ``epochs``, ``lr_milestones`` and ``augmentation`` from
    the dataset's :data:`RECIPES`, ``warmup_lr`` as ``lr / 10``; ``val_size`` stays None (the
    paper's split, see ``image_data``) and so do ``train_subset`` and ``image_size`` (none).
    The options of one model stay None for the other: ``depth`` and ``p_last`` (0.5) are
    filled for ``model="resnet"``, the ``vit_*`` fields and ``drop_path_rate`` for
    ``model="vit"`` (from :data:`VIT_DEFAULTS`), and giving one for the other model is an error.
    ``plain`` and ``p_last == 1`` (a ViT: ``drop_path_rate == 0``) are made to agree. A Recipe
    is therefore complete and valid.

    A checkpoint stores it as a dict and ``metrics.json``'s config holds its fields;
    :meth:`from_dict` reads both back. Whatever was stored before a field existed was
    trained with that field's default, so a new field's default must be what runs did
    without it.

    Raises
    ------
    ValueError
        For a value out of range, naming the option as the command line does
        (``--depth must be 6n+2 ..., got 21``).
    """

    dataset: str = "cifar10"
    val_size: int | None = None
    train_subset: int | None = None
    model: str = "resnet"
    depth: int | None = None
    shortcut: str = "A"
    p_last: float | None = None
    plain: bool = False
    survival_rule: str = "linear"
    vit_layers: int | None = None
    vit_width: int | None = None
    vit_heads: int | None = None
    vit_patch: int | None = None
    drop_path_rate: float | None = None
    epochs: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    optimizer: str = "sgd"
    lr_schedule: str = "step"
    lr_milestones: tuple[float, ...] | None = None
    dropped_update: str = "decay"
    augmentation: str | None = None
    seed: int = 0
    image_size: int | None = None
    warmup_steps: int = 0
    warmup_lr: float | None = None
    warmup_shape: str = "constant"
    schedule_unit: str = "epoch"
    eval_every: int = 1
    drop_schedule: str = "constant"
    drop_switch: float = 0.25

    def __post_init__(self) -> None:
        def fill(name: str, value: Any) -> None:  # how a frozen dataclass completes itself (see dataclasses)
            object.__setattr__(self, name, value)

        if self.dataset not in RECIPES:
            raise ValueError(f"--dataset must be one of {', '.join(RECIPES)}, got {self.dataset!r}")
        if self.model not in CHOICES["model"]:
            raise ValueError(f"--model must be one of {', '.join(CHOICES['model'])}, got {self.model!r}")
        # Each model's own options are filled for it and refused for the other, which would ignore them.
        if self.model == "vit":
            own, others, hint = dict(VIT_DEFAULTS), ("depth", "p_last"), " (a ViT's: --vit-layers, --drop-path-rate)"
        else:
            own, others, hint = dict(p_last=0.5), tuple(VIT_DEFAULTS), ""
        for name in others:
            if getattr(self, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} is an option of the other --model, got "
                                 f"{getattr(self, name)} with --model {self.model}{hint}")
        for name, value in [*RECIPES[self.dataset].items(), *own.items()]:
            if getattr(self, name) is None and name not in others:
                fill(name, value)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if isinstance(self.lr_milestones, (int, float)):
            raise ValueError(f"--lr-milestones is a list of fractions, got {self.lr_milestones!r}")
        fill("lr_milestones", tuple(self.lr_milestones))  # argparse and stored recipes give lists
        if self.model == "resnet":
            if self.plain:
                fill("p_last", 1.0)
            fill("plain", self.p_last == 1.0)
            if self.depth < 8 or (self.depth - 2) % 6:
                raise ValueError(f"--depth must be 6n+2 (20, 32, 44, 56, 110, 152, 1202, ...), got {self.depth}")
            if not 0.0 < self.p_last <= 1.0:
                raise ValueError(f"--p-last must be in (0, 1], got {self.p_last}")
        else:
            self._check_vit()
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.train_subset is not None and self.train_subset < 1:
            raise ValueError(f"--train-subset must be positive, got {self.train_subset}")
        if any(not 0.0 < f <= 1.0 for f in self.lr_milestones):
            raise ValueError(f"--lr-milestones are fractions of the epochs in (0, 1], got {list(self.lr_milestones)}")
        if self.seed < 0:
            raise ValueError(f"--seed must be non-negative, got {self.seed}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"--image-size must be at least 8 pixels, got {self.image_size}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be non-negative, got {self.warmup_steps}")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"--{name.replace('_', '-')} must be {'positive' if name == 'lr' else 'non-negative'} "
                                 f"and finite, got {value}")  # fmt: skip
        if self.val_size is not None and self.val_size < 0:
            raise ValueError(f"--val-size must be non-negative, got {self.val_size}")
        if not (math.isfinite(self.drop_switch) and 0.0 < self.drop_switch < 1.0):
            raise ValueError(f"--drop-switch is a fraction of the steps in (0, 1), got {self.drop_switch}")
        if self.plain and self.drop_schedule != "constant":
            raise ValueError(f"--drop-schedule {self.drop_schedule} needs stochastic depth, not --plain (or "
                             f"{'--drop-path-rate 0' if self.model == 'vit' else '--p-last 1'})")
        if self.warmup_lr is None:
            fill("warmup_lr", self.lr / 10)
        if not (math.isfinite(self.warmup_lr) and self.warmup_lr > 0):
            raise ValueError(f"--warmup-lr must be positive and finite, got {self.warmup_lr}")

    def _check_vit(self) -> None:
        """``--model vit``'s options; makes ``plain`` and ``drop_path_rate == 0`` agree."""
        if self.plain:
            object.__setattr__(self, "drop_path_rate", 0.0)
        if not (math.isfinite(self.drop_path_rate) and 0.0 <= self.drop_path_rate < 1.0):
            raise ValueError(f"--drop-path-rate is the last block's drop probability, in [0, 1), "
                             f"got {self.drop_path_rate}")
        object.__setattr__(self, "plain", self.drop_path_rate == 0.0)
        for name in ("vit_layers", "vit_width", "vit_heads", "vit_patch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.vit_width % self.vit_heads:
            raise ValueError(f"--vit-width must be divisible by --vit-heads, got {self.vit_width} and {self.vit_heads}")
        side = self.image_size or IMAGE_SIZES[self.dataset]
        if side % self.vit_patch:
            raise ValueError(f"--vit-patch must divide the images' side ({side} pixels"
                             f"{'' if self.image_size else ', see --image-size'}), got {self.vit_patch}")
        if self.vit_layers == 1 and not self.plain:
            raise ValueError("--vit-layers 1 has no block that drops: the rates rise from 0 at the first block "
                             "(timm's rule); give more layers or --plain")
        # timm's rule gives the ResNet options no meaning: refuse the values that would ask for something else.
        if self.survival_rule != "linear":
            raise ValueError(f"--survival-rule {self.survival_rule} is the ResNet's; a ViT's drop rates rise "
                             "linearly from 0 at the first block to --drop-path-rate at the last (timm's rule)")
        if self.shortcut != "A":
            raise ValueError(f"--shortcut {self.shortcut} is the ResNet's; a ViT has identity shortcuts")

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> Recipe:
        """The recipe in `stored`: a checkpoint's ``"recipe"``, a ``metrics.json`` ``"config"``
        or ``vars(parse_args())``. Keys that are no field (the run options) are ignored; fields
        missing from it take their defaults (it was written before they existed)."""
        names = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in stored.items() if name in names})

    def differences(self, other: Recipe) -> list[str]:
        """``"--option <self's value> there, <other's value> here"`` for each field that differs."""
        return [
            f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r} there, {getattr(other, f.name)!r} here"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


_DEFAULTS = {f.name: f.default for f in fields(Recipe)}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, except where the help says the default itself (or a flag has none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or "") or isinstance(action, argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line `argv` (default: ``sys.argv``), checked.

    The namespace holds the run options and the fields of the completed :class:`Recipe`
    (``Recipe.from_dict(vars(args))`` gives it back). Exits with argparse's usage message for a
    bad value, naming it.
    """
    parser = argparse.ArgumentParser(
        description="Train a ResNet with stochastic depth (or without) with the paper's recipe, or a small ViT.",
        formatter_class=_HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=CHOICES["dataset"], default=_DEFAULTS["dataset"])
    data.add_argument("--data-dir", help="where the dataset is or goes (default: per dataset, see image_data.py)")
    data.add_argument("--no-download", dest="download", action="store_false", help="never download a missing dataset")
    data.add_argument("--val-size", type=int, default=_DEFAULTS["val_size"],
                      help="validation images held out of the training set (default: the paper's)")
    data.add_argument("--train-subset", type=int, default=_DEFAULTS["train_subset"],
                      help="train on only this many images (smoke tests, quick runs)")
    data.add_argument("--augmentation", choices=CHOICES["augmentation"],
                      default=_DEFAULTS["augmentation"], help="default: per dataset")
    data.add_argument("--image-size", type=int, default=_DEFAULTS["image_size"],
                      help="resize every image to this many pixels a side (bilinear, "
                      "antialiased) before anything else, e.g. 16 for a cheaper Fashion-MNIST run; a multiple of 4 for the "
                      "CIFAR networks with option A shortcuts, whose stages halve it twice (default: as stored)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=CHOICES["model"], default=_DEFAULTS["model"],
                       help="'resnet': the paper's CIFAR ResNet (--depth, --p-last); 'vit': a timm VisionTransformer "
                       "(--vit-layers, --vit-width, --vit-heads, --vit-patch, --drop-path-rate)")
    model.add_argument("--depth", type=int, default=_DEFAULTS["depth"], help="ResNet: 6n+2; default 110 (SVHN: 152)")
    model.add_argument("--shortcut", choices=CHOICES["shortcut"], default=_DEFAULTS["shortcut"], help="ResNet")
    model.add_argument("--p-last", type=float, default=_DEFAULTS["p_last"],
                       help="ResNet: survival probability of the last block; 1 = plain (default 0.5)")
    model.add_argument("--plain", action="store_true", default=_DEFAULTS["plain"],
                       help="train the plain network: no drops (same as --p-last 1, a ViT's --drop-path-rate 0)")
    model.add_argument("--survival-rule", choices=CHOICES["survival_rule"], default=_DEFAULTS["survival_rule"],
                       help="ResNet: how p_l falls from block to block")
    model.add_argument("--vit-layers", type=int, default=_DEFAULTS["vit_layers"],
                       help=f"ViT: transformer blocks (default {VIT_DEFAULTS['vit_layers']})")
    model.add_argument("--vit-width", type=int, default=_DEFAULTS["vit_width"],
                       help=f"ViT: embedding width, a multiple of --vit-heads; the MLPs are 4 times wider (default "
                       f"{VIT_DEFAULTS['vit_width']})")
    model.add_argument("--vit-heads", type=int, default=_DEFAULTS["vit_heads"],
                       help=f"ViT: attention heads (default {VIT_DEFAULTS['vit_heads']})")
    model.add_argument("--vit-patch", type=int, default=_DEFAULTS["vit_patch"],
                       help=f"ViT: side of the square patches in pixels, which must divide the images' side (after "
                       f"--image-size) (default {VIT_DEFAULTS['vit_patch']})")
    model.add_argument("--drop-path-rate", type=float, default=_DEFAULTS["drop_path_rate"],
                       help="ViT: drop probability of the last block's two branches; timm's rule makes it rise "
                       "linearly from 0 at the first block; dropped samples skip the branch (row_subset: the k of B "
                       "samples that keep it scaled by B/k, about 1/(1-p), in training, as timm's DropPath). 0 = plain "
                       f"(default {VIT_DEFAULTS['drop_path_rate']}, DeiT-Tiny's)")
    model.add_argument("--drop-schedule", choices=CHOICES["drop_schedule"], default=_DEFAULTS["drop_schedule"],
                       help="when blocks are dropped: 'constant', at the rates of --p-last (a ViT: --drop-path-rate) "
                       "throughout (the paper); 'early', at those rates for the first --drop-switch of the optimizer "
                       "steps, then never; 'late', never before, then at those rates (Liu et al., 2023). Evaluation "
                       "scales each residual by the survival probability in force at the last step (a ViT's gates "
                       "scale in training instead): after 'early', every block at full strength")
    model.add_argument("--drop-switch", type=float, default=_DEFAULTS["drop_switch"],
                       help="fraction of the run's optimizer steps after which an 'early' schedule stops dropping and "
                       "a 'late' one starts: step floor(f * epochs * steps per epoch), whatever --max-steps stops at; "
                       "the start-up line prints that step")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=_DEFAULTS["epochs"], help="default 500 (SVHN: 50)")
    optim.add_argument("--batch-size", type=int, default=_DEFAULTS["batch_size"], help="of all processes together")
    optim.add_argument("--lr", type=float, default=_DEFAULTS["lr"], help="the peak lr (a ViT with AdamW: e.g. 1e-3)")
    optim.add_argument("--optimizer", choices=CHOICES["optimizer"], default=_DEFAULTS["optimizer"],
                       help="'sgd': the paper's (--momentum, Nesterov), weight decay on every parameter; 'adamw': "
                       "torch's AdamW (betas 0.9, 0.999) through timm's create_optimizer_v2, as DeiT: no weight "
                       "decay on biases, norms, the position embedding and the class token")
    optim.add_argument("--momentum", type=float, default=_DEFAULTS["momentum"], help="SGD")
    optim.add_argument("--weight-decay", type=float, default=_DEFAULTS["weight_decay"],
                       help="SGD: L2 (the paper's 1e-4); AdamW: decoupled (DeiT's 0.05)")
    optim.add_argument("--no-nesterov", dest="nesterov", action="store_false", default=_DEFAULTS["nesterov"],
                       help="SGD")
    optim.add_argument("--lr-schedule", choices=CHOICES["lr_schedule"], default=_DEFAULTS["lr_schedule"],
                       help="'step': lr /= 10 after each of --lr-milestones (the paper); 'cosine': from --lr down to 0 "
                       "over the run (torch's CosineAnnealingLR), per --schedule-unit")
    optim.add_argument("--lr-milestones", type=float, nargs="+", default=_DEFAULTS["lr_milestones"],
                       help="fractions of the run (see --schedule-unit) after which lr /= 10 (--lr-schedule step)")
    optim.add_argument("--schedule-unit", choices=CHOICES["schedule_unit"], default=_DEFAULTS["schedule_unit"],
                       help="'epoch': lr drops after floor(f * epochs) epochs (the paper); 'step': after "
                       "floor(f * total steps) optimizer steps, for runs of a fixed number of steps or under one epoch")
    optim.add_argument("--warmup-steps", type=int, default=_DEFAULTS["warmup_steps"],
                       help="warm the first N optimizer steps up from --warmup-lr (see --warmup-shape; He et al. warm "
                       "ResNet-110 up at lr 0.01 for about 400 iterations); the schedule then goes on as without it")
    optim.add_argument("--warmup-lr", type=float, default=_DEFAULTS["warmup_lr"],
                       help="lr of the warm-up steps (default: --lr / 10)")
    optim.add_argument("--warmup-shape", choices=CHOICES["warmup_shape"], default=_DEFAULTS["warmup_shape"],
                       help="'constant': every warm-up step at --warmup-lr (He et al.); 'linear': from --warmup-lr "
                       "at the first step towards the scheduled lr, reached at step --warmup-steps (Goyal et al., 2017)")
    optim.add_argument(
        "--dropped-update",
        choices=CHOICES["dropped_update"],
        default=_DEFAULTS["dropped_update"],
        help="'decay': a dropped block's parameters get a zero gradient, so weight decay and momentum still "
        "move them (the official code, which produced the paper's numbers); 'skip': they are left alone "
        "for that step (PyTorch's optimizers skip parameters whose grad is None)",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="outputs/train")
    run.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                     help="continue from CHECKPOINT (default: OUTPUT_DIR/checkpoint.pt)")  # fmt: skip
    run.add_argument("--seed", type=int, default=_DEFAULTS["seed"], help="weights, split, batch order, drops, augmentation")
    run.add_argument("--max-steps", type=int,
                     help="stop after this many optimizer steps in all (smoke tests); the schedules still follow "
                     "--epochs. Stopped inside an epoch, a run writes checkpoint.pt (metrics.json: at each epoch's end)")
    run.add_argument("--device", help="default: cuda (this process's GPU under torchrun) if available, else cpu")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                     help="channels_last memory format (default: on CUDA only)")  # fmt: skip
    run.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype")
    run.add_argument("--eval-batch-size", type=int, default=1000)
    run.add_argument("--eval-every", type=int, default=_DEFAULTS["eval_every"],
                     help="evaluate on the validation and test sets every N epochs and after the last one; "
                     "the best validation epoch is chosen among those")
    run.add_argument("--log-every", type=int, default=20, help="steps between loss checks and progress updates")
    run.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)

    try:
        recipe = Recipe.from_dict(vars(args))
    except ValueError as error:
        parser.error(str(error))
    vars(args).update(asdict(recipe))
    for name in ("eval_batch_size", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be positive, got {args.max_steps}")
    return args


# ----------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------


@dataclass
class Processes:
    """This process's place in the run: rank, number of processes, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def start_processes(device: str | None) -> Processes:
    """Join torchrun's process group if launched by it (environment variables), else run alone."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels (as the official code)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Processes(rank, world_size, local_rank, device)


def _all_reduce_sum(tensor: Tensor, processes: Processes) -> Tensor:
    if processes.distributed:
        dist.all_reduce(tensor)
    return tensor


# ----------------------------------------------------------------------------------
# Model, optimiser, evaluation
# ----------------------------------------------------------------------------------


def build_model(recipe: Recipe, in_channels: int, num_classes: int) -> nn.Module:
    """The recipe's network for (N, `in_channels`, H, W) images, `num_classes` logits.

    ``model="resnet"``: the CIFAR ResNet of ``recipe.depth``, a ``StochasticResNet`` unless
    ``recipe.plain`` (``training.build_resnet``). ``model="vit"``: :func:`build_vit`. Either
    way the same initial weights for the same ``recipe.seed``, plain or not (torch's global RNG
    is seeded with it). `recipe` may also be :func:`parse_args`' namespace, which has the same
    attributes.
    """
    if recipe.model == "vit":
        return build_vit(recipe, in_channels, num_classes)
    stochastic = None if recipe.plain else dict(p_last=recipe.p_last, survival_rule=recipe.survival_rule, seed=recipe.seed)
    return build_resnet("cifar", recipe.depth, seed=recipe.seed, stochastic=stochastic,
                        in_channels=in_channels, num_classes=num_classes, shortcut=recipe.shortcut)  # fmt: skip


def build_vit(recipe: Recipe, in_channels: int, num_classes: int) -> nn.Module:
    """timm's ``VisionTransformer`` of the recipe's shape, with stochastic-depth gates unless ``recipe.plain``.

    Images of ``recipe.image_size`` (else the dataset's :data:`IMAGE_SIZES`) pixels a side, cut
    into ``vit_patch``-pixel patches, plus a class token; ``vit_layers`` pre-norm blocks of
    width ``vit_width``, ``vit_heads`` heads and MLPs 4 times wider; the class token's
    features classify. timm's ``drop_path_rate`` rule gives block l of L (0-based) the drop
    probability ``drop_path_rate * l / (L - 1)`` on both branches, and ``add_stochastic_depth``
    keeps those rates, per sample (``"row_subset"``: a dropped sample's branch is not computed)
    and inverted (kept branches scaled by ``B / k`` in training, none at test time), as timm's
    ``DropPath`` but without computing the dropped rows. Needs timm.
    """
    from timm.models.vision_transformer import VisionTransformer  # timm is needed for the ViT only

    torch.manual_seed(recipe.seed)  # the weights; drop_path_rate draws nothing, so plain and stochastic start alike
    model = VisionTransformer(
        img_size=recipe.image_size or IMAGE_SIZES[recipe.dataset], patch_size=recipe.vit_patch, in_chans=in_channels,
        num_classes=num_classes, embed_dim=recipe.vit_width, depth=recipe.vit_layers, num_heads=recipe.vit_heads,
        mlp_ratio=4.0, drop_path_rate=recipe.drop_path_rate,
    )  # fmt: skip
    # The plain ViT stays unconverted (timm puts nn.Identity where the rate is 0), as the plain ResNet is a
    # ResNet without gates: its step is the unmodified network's, so the step-time ratios of the stochastic
    # arms count what their gates cost as well as what they skip (add_stochastic_depth would also warn that
    # gates at rate 0 never drop).
    if not recipe.plain:
        add_stochastic_depth(model, seed=recipe.seed)
    return model


def make_optimizer(
    model: nn.Module, recipe: Recipe, steps_per_epoch: int = 1
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The recipe's optimizer and its lr schedule.

    ``--optimizer sgd``: SGD (Nesterov, no dampening), weight decay on every parameter, as the
    paper. ``adamw``: torch's AdamW from ``timm.optim.create_optimizer_v2``, in two parameter
    groups: weight decay on the weight matrices and convolution kernels, none on biases, norms
    and what the model's ``no_weight_decay()`` names (a ViT's position embedding and class
    token), as DeiT.

    The schedule (``--lr-schedule step``: ``MultiStepLR``; ``cosine``: ``CosineAnnealingLR`` to 0
    at the end of the run) is stepped once per epoch, or once per optimizer step with
    ``--schedule-unit step`` (its milestones and length are then in steps of the
    ``epochs * steps_per_epoch`` of the run). The warm-up is not part of it (see :func:`warmup_lr`).
    `recipe` may also be :func:`parse_args`' namespace.
    """
    if recipe.optimizer == "adamw":
        from timm.optim import create_optimizer_v2  # timm is needed for AdamW only

        optimizer = create_optimizer_v2(model, "adamw", lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=recipe.momentum, dampening=0.0,
            weight_decay=recipe.weight_decay, nesterov=recipe.nesterov,
        )  # fmt: skip
    length = recipe.epochs * (steps_per_epoch if recipe.schedule_unit == "step" else 1)
    if recipe.lr_schedule == "cosine":
        # Stepped `length` times, it reaches eta_min at the end of the run; the warm-up overrides its first
        # values (timm's schedulers too start the cosine at step 0, under the warm-up, by default).
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=length, eta_min=0.0)
    # lr /= 10 after floor(f * epochs) epochs: the paper's "after epochs 250 and 375" of 500, and the
    # official code's rule (epoch < f * epochs keeps the higher rate) where f * epochs is not whole.
    milestones = [math.floor(f * length) for f in recipe.lr_milestones]
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)


def drop_scale(recipe: Recipe, step: int, total_steps: int) -> float:
    """The gates' ``drop_scale`` at 0-based optimizer `step` of a run of `total_steps` (``--drop-schedule``).

    1 throughout for ``"constant"``; ``"early"`` and ``"late"`` switch at step
    ``floor(drop_switch * total_steps)`` (:func:`stochastic_depth.schedules.early_drops`, ``late_drops``).
    It depends on the step alone, so a resumed run continues the schedule.
    """
    switch = math.floor(recipe.drop_switch * total_steps)
    if recipe.drop_schedule == "early":
        return early_drops(step, switch)
    if recipe.drop_schedule == "late":
        return late_drops(step, switch)
    return 1.0


class warmup_lr:
    """Context manager: the optimizer steps taken inside it use the warm-up lr at `step`, if `step < steps`.

    ``"constant"``: `lr` throughout the warm-up; ``"linear"``: ``lr + (scheduled - lr) * step / steps``
    at 0-based optimizer step `step`. The scheduled lr is put back on exit, so the scheduler (and
    the checkpoint) never see the warm-up: after it, training goes on exactly as the schedule says.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, step: int, steps: int, shape: str = "constant") -> None:
        if shape not in ("constant", "linear"):
            raise ValueError(f"unknown warm-up shape {shape!r}: expected 'constant' or 'linear'")
        self.optimizer, self.lr, self.step, self.steps, self.shape = optimizer, lr, step, steps, shape
        self.active = step < steps
        self.scheduled: list[float] = []

    def __enter__(self) -> None:
        if self.active:
            self.scheduled = [group["lr"] for group in self.optimizer.param_groups]
            for group in self.optimizer.param_groups:
                fraction = 0.0 if self.shape == "constant" else self.step / self.steps
                group["lr"] = self.lr + (group["lr"] - self.lr) * fraction

    def __exit__(self, *exc_info: Any) -> None:
        if self.active:
            for group, lr in zip(self.optimizer.param_groups, self.scheduled):
                group["lr"] = lr


def resize_split(split: image_data.LabelledImages, size: int) -> image_data.LabelledImages:
    """`split` with its (N, C, H, W) images resized to (N, C, size, size) float32 (bilinear, antialiased)."""
    images = F.interpolate(split.images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return image_data.LabelledImages(images, split.labels)


def prepare_gradients(model: nn.Module, dropped_update: str) -> bool:
    """Set up ``--dropped-update``; returns the ``set_to_none`` to pass to ``zero_grad``.

    "decay" (the official code): every parameter gets a zero gradient now, and ``zero_grad``
    keeps zeroing it, so a dropped block's stays zero and SGD still applies weight decay and
    momentum to it (DDP leaves the gradients of parameters no process used untouched).
    "skip": gradients are set to None before each step, so a dropped block's stay None and SGD
    leaves its parameters and momentum as they are.
    """
    if dropped_update not in ("decay", "skip"):
        raise ValueError(f"unknown dropped_update {dropped_update!r}: expected 'decay' or 'skip'")
    if dropped_update == "decay":
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
    return dropped_update == "skip"


def mixed_precision(amp: str, device: torch.device) -> tuple[Any, torch.amp.GradScaler]:
    """Autocast context and gradient scaler for ``--amp`` none, bf16 or fp16 (the only one that scales)."""
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    autocast = torch.autocast(device.type, dtype) if dtype is not None else nullcontext()
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def training_step(
    network: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, autocast: Any,
    images: Tensor, labels: Tensor, set_to_none: bool,
) -> tuple[Tensor, Tensor]:
    """One optimizer step on one batch; returns the loss and the logits (not synchronised)."""
    optimizer.zero_grad(set_to_none=set_to_none)
    with autocast:
        logits = network(images)
        loss = F.cross_entropy(logits, labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


def evaluate(
    model: nn.Module, split: image_data.LabelledImages, preprocess: image_data.Preprocess, processes: Processes,
    *, batch_size: int, autocast: Any = None,
) -> tuple[float, float]:
    """Mean cross-entropy (nats per image) and error rate (fraction) of `model` on all of `split`.

    `model` runs in eval mode (``training.predict``: each of its modules has its own mode
    back afterwards) on this process's share of `split` (every ``world_size``-th image from
    its rank), `batch_size` images at a time, preprocessed without augmentation, under
    `autocast` if given; the sums are all-reduced, so every process returns the same numbers.
    `split` holds (N, C, H, W) images and (N,) labels on ``processes.device``.
    """
    share = slice(processes.rank, None, processes.world_size)
    logits = predict(model, split.images[share], batch_size=batch_size, preprocess=preprocess, autocast=autocast).float()
    labels = split.labels[share]
    totals = torch.zeros(3, device=processes.device)  # loss sum, errors, images
    totals[0] = F.cross_entropy(logits, labels, reduction="sum")
    totals[1] = (logits.argmax(1) != labels).sum()
    totals[2] = len(labels)
    loss, errors, count = _all_reduce_sum(totals, processes).tolist()
    return loss / count, errors / count


def _share_batchnorm_statistics(model: nn.Module, processes: Processes) -> None:
    """Give every process rank 0's BatchNorm statistics: each process updated its own on its
    share of the batches, and rank 0's are the ones evaluated everywhere and checkpointed. (A ViT
    has LayerNorms and no buffers: nothing to send.)"""
    if processes.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# ----------------------------------------------------------------------------------
# Checkpoints and metrics
# ----------------------------------------------------------------------------------


@dataclass
class EpochProgress:
    """This process's training totals of the epoch under way.

    A checkpoint written inside an epoch (``--max-steps``) keeps them added up over all
    processes; after a resume rank 0 carries them and the others start from zero, so that the
    resumed run reports that epoch as an uninterrupted one would.

    Attributes
    ----------
    totals : Tensor
        (2,) float32: the sum of the batch-mean losses times the batch sizes (nats) and the
        number of misclassified training images. On the training device while it runs, so
        that no step waits for the device to add to it.
    images_seen : int
        Training images seen, kept on the host: a tensor made from it on a GPU would wait.
    active_blocks : float
        Sum over the steps of the number of residual blocks that ran (stochastic depth only; per
        sample in the row modes, see :meth:`Training.active_blocks`).
    seconds : float
        Training time of the steps so far (wall clock, device synchronised).
    """

    totals: Tensor = field(default_factory=lambda: torch.zeros(2))
    images_seen: int = 0
    active_blocks: float = 0.0
    seconds: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``"partial_epoch"``: plain values and a CPU tensor (``weights_only`` loads)."""
        return {"totals": self.totals.cpu(), "images_seen": self.images_seen, "active_blocks": self.active_blocks,
                "seconds": self.seconds}  # fmt: skip

    def summed_over(self, processes: Processes) -> EpochProgress:
        """This progress with `totals` and `images_seen` added up over all processes (a collective)."""
        images_seen = torch.tensor([self.images_seen], dtype=self.totals.dtype, device=processes.device)
        summed = _all_reduce_sum(torch.cat([self.totals.to(processes.device), images_seen]), processes)
        return replace(self, totals=summed[:2], images_seen=int(summed[2].item()))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> EpochProgress:
        """Read :meth:`state_dict`'s dict back; ``{}`` (saved at the end of an epoch) is a new epoch."""
        return cls(**state)


def load_checkpoint(path: Path, recipe: Recipe, processes: Processes) -> dict[str, Any]:
    """The checkpoint at `path`: rank 0 reads it and sends it to the others (no shared disk needed).

    Raises FileNotFoundError if there is none, and ValueError naming each option whose value
    differs between its recipe and `recipe`.
    """
    box: list[Any] = [None]
    if processes.is_main:
        if not path.is_file():
            box[0] = FileNotFoundError(f"--resume: no checkpoint at {path}")
        else:
            box[0] = torch.load(path, map_location="cpu", weights_only=True)
    if processes.distributed:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    checkpoint = box[0]
    differing = Recipe.from_dict(checkpoint["recipe"]).differences(recipe)
    if differing:
        raise ValueError(f"{path} is a run with other options ({'; '.join(differing)}): resume it with the same options")
    return checkpoint


def checkpoint_to_resume(recipe: Recipe, args: argparse.Namespace, processes: Processes) -> dict[str, Any] | None:
    """The checkpoint ``--resume`` asks for (see :func:`load_checkpoint`), or None for a new run.

    Raises FileExistsError when a new run would overwrite the checkpoint of another.
    """
    path = Path(args.output_dir) / "checkpoint.pt"
    if args.resume is not None:
        return load_checkpoint(path if args.resume is True else Path(args.resume), recipe, processes)
    if processes.is_main and path.exists():
        raise FileExistsError(f"{path} exists: pass --resume to continue that run, or another --output-dir")
    return None


def write_metrics(output_dir: Path, records: list[dict[str, Any]], summary: dict[str, Any], config: dict[str, Any]) -> None:
    """``metrics.json`` (config, summary, the per-epoch records) and ``metrics.csv`` (the records,
    one row per epoch in :data:`METRIC_COLUMNS`), each written atomically."""
    write_json_atomically(output_dir / "metrics.json", {"config": config, "summary": summary, "epochs": records}, indent=1)

    def write_csv(path: Path) -> None:
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(records)

    write_atomically(output_dir / "metrics.csv", write_csv)


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's result: test error at the epoch of lowest validation error (the first such epoch)."""
    if not records:
        return {}
    summary: dict[str, Any] = {"epochs_done": len(records), "final_test_error": records[-1]["test_error"]}
    evaluated = [r for r in records if r["val_error"] is not None]  # (--eval-every skips epochs)
    if evaluated:
        best = min(evaluated, key=lambda r: r["val_error"])
        summary.update(best_val_epoch=best["epoch"], best_val_error=best["val_error"], test_error_at_best_val=best["test_error"])
    times = sorted(r["epoch_time_s"] for r in records)
    summary.update(median_epoch_time_s=times[len(times) // 2], total_train_time_s=sum(times))
    return summary


# ----------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What :func:`main` returns: per-epoch metrics, the summary, the model and (if asked) the drops."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    model: nn.Module
    steps: int
    drops: list[Tensor] | None = None


@dataclass
class Data:
    """The run's data, on the training device: training batches, validation and test splits."""

    batches: BatchSampler  # the global batches, the same in every process
    preprocess: image_data.Preprocess  # normalisation, augmentation, memory format
    val: image_data.LabelledImages  # (N, C, H, W) stored images and (N,) labels; N may be 0
    test: image_data.LabelledImages
    in_channels: int
    num_classes: int
    seed: int  # of the augmentation
    generator: torch.Generator  # the augmentation's, reseeded at each step

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.batches_per_epoch

    def next_share(self, step: int, processes: Processes) -> tuple[Tensor, Tensor]:
        """This process's share of the next global batch, preprocessed and augmented for `step`."""
        images, labels = self.batches.next_batch()
        # Each step's shifts and flips depend on the seed and step alone: no state to checkpoint,
        # and the same for any number of processes, as the whole batch is augmented before it is shared.
        self.generator.manual_seed((self.seed << 32) + step)
        images = self.preprocess(images, self.generator)
        share = slice(processes.rank, None, processes.world_size)
        return images[share], labels[share]


def load_data(recipe: Recipe, args: argparse.Namespace, processes: Processes) -> Data:
    """The recipe's splits (its subset, resized), normalised by the training images' statistics.

    The first process of each machine downloads a missing dataset, the others wait and then
    read it. Raises ValueError when a batch, or the last batch of an epoch, has fewer images
    than there are processes (each needs a share), and ``image_data.DatasetUnavailableError``
    when the dataset is missing and cannot be downloaded.
    """
    if recipe.batch_size < processes.world_size:
        raise ValueError(f"--batch-size {recipe.batch_size} is smaller than the {processes.world_size} processes")
    if processes.local_rank != 0:
        processes.barrier()
    splits = image_data.load_splits(
        recipe.dataset, args.data_dir, val_size=recipe.val_size, seed=recipe.seed, download=args.download
    )
    if processes.local_rank == 0:
        processes.barrier()
    if recipe.train_subset is not None:  # the split is random, so the first images are a random subset
        splits.train = image_data.LabelledImages(splits.train.images[: recipe.train_subset], splits.train.labels[: recipe.train_subset])
    if recipe.image_size is not None:
        splits.train, splits.val, splits.test = (resize_split(s, recipe.image_size) for s in (splits.train, splits.val, splits.test))
    device = processes.device
    mean_image, std = image_data.normalisation(splits.train)
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    preprocess = image_data.Preprocess(mean_image, std, recipe.augmentation, channels_last)
    val, test = (image_data.LabelledImages(s.images.to(device), s.labels.to(device)) for s in (splits.val, splits.test))
    batches = BatchSampler(splits.train.images, splits.train.labels, recipe.batch_size, seed=recipe.seed, device=device)
    last_batch = len(splits.train.labels) - (batches.batches_per_epoch - 1) * recipe.batch_size
    if last_batch < processes.world_size:
        raise ValueError(
            f"the last batch of an epoch has {last_batch} images, fewer than the {processes.world_size} processes: "
            "change --batch-size or --val-size"
        )
    return Data(batches, preprocess, val, test, splits.train.images.shape[1], splits.num_classes, recipe.seed,
                torch.Generator(device))  # fmt: skip


@dataclass
class Training:
    """What the optimizer steps use and change."""

    model: nn.Module  # a ResNet, StochasticResNet or timm VisionTransformer (converted or not)
    network: nn.Module  # what the steps call: `model`, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer  # SGD or AdamW
    scheduler: torch.optim.lr_scheduler.LRScheduler  # MultiStepLR or CosineAnnealingLR
    autocast: Any  # context manager of --amp
    scaler: torch.amp.GradScaler
    set_to_none: bool  # zero_grad's, for --dropped-update
    gates: list[StochasticDepth] = field(default_factory=list)  # the model's, in block order; none if plain
    blocks: int = 0  # the model's residual blocks (a ViT block holds two gates)

    @property
    def stochastic(self) -> bool:
        return bool(self.gates)

    def active_blocks(self, last_active: Tensor) -> float:
        """Blocks the last training pass computed, per sample, from its ``last_active()``: each gate counts
        the share of the batch that kept its branch, over the gates per block (a ViT block has two). A
        ResNet's count of blocks run."""
        kept = last_active.reshape(len(self.gates), -1).float().mean(1).sum().item()  # on the CPU: no sync
        return kept * self.blocks / len(self.gates)

    def last_active(self) -> Tensor:
        """What each gate kept in the last training pass: (gates,) bool in batch mode (a ResNet's
        ``active_blocks``), (gates, batch) in the row modes (a ViT's two gates per block)."""
        return torch.stack([gate.last_active for gate in self.gates])


def build_training(recipe: Recipe, args: argparse.Namespace, processes: Processes, data: Data) -> Training:
    """The recipe's model on the device, wrapped for DDP under torchrun, its optimizer and schedule."""
    device = processes.device
    model = build_model(recipe, data.in_channels, data.num_classes).to(device)
    if data.preprocess.channels_last:
        model = model.to(memory_format=torch.channels_last)
    network: nn.Module = model
    gates = stochastic_depth_gates(model)
    if processes.distributed:
        # A block dropped for the whole batch produces no gradient: DDP must then look for unused parameters
        # each step. In "row_subset" mode every branch runs on at least one sample (round(B p), at least 1 for
        # p > 0), so a ViT's parameters all get gradients and DDP can skip the search.
        network = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=any(gate.mode != "row_subset" or gate.survival_prob == 0.0 for gate in gates),
        )  # fmt: skip
    optimizer, scheduler = make_optimizer(model, recipe, data.steps_per_epoch)
    autocast, scaler = mixed_precision(args.amp, device)
    set_to_none = prepare_gradients(model, recipe.dropped_update)
    blocks = len(model.blocks) if gates else 0
    return Training(model, network, optimizer, scheduler, autocast, scaler, set_to_none, gates, blocks)


def save_checkpoint(
    path: Path, recipe: Recipe, training: Training, batches: BatchSampler, step: int, records: list[dict[str, Any]],
    progress: EpochProgress | None,
) -> None:
    """Everything a resumed run needs, written atomically; `progress` is None at the end of an epoch.

    Only plain values and tensors, so that it loads with ``weights_only=True``.
    """
    model = training.model
    save_atomically(
        {
            "recipe": asdict(recipe),
            "step": step,
            "records": records,
            "partial_epoch": {} if progress is None else progress.state_dict(),
            "model": model.state_dict(),
            "optimizer": training.optimizer.state_dict(),
            "scheduler": training.scheduler.state_dict(),
            "scaler": training.scaler.state_dict(),
            "batches": batches.state_dict(),
            "stochastic_depth": stochastic_depth_state(model).get_state() if training.stochastic else None,
        },
        path,
    )


def restore_checkpoint(
    checkpoint: Mapping[str, Any], training: Training, batches: BatchSampler
) -> tuple[int, list[dict[str, Any]], EpochProgress]:
    """Put the checkpoint's state into `training` and `batches`; returns its step, records and epoch progress."""
    training.model.load_state_dict(checkpoint["model"])
    training.optimizer.load_state_dict(checkpoint["optimizer"])
    training.scheduler.load_state_dict(checkpoint["scheduler"])
    training.scaler.load_state_dict(checkpoint["scaler"])
    batches.load_state_dict(checkpoint["batches"])
    if training.stochastic:
        stochastic_depth_state(training.model).set_state(checkpoint["stochastic_depth"])
    return checkpoint["step"], checkpoint["records"], EpochProgress.from_state_dict(checkpoint["partial_epoch"])


def main(argv: list[str] | None = None, *, record_drops: bool = False) -> RunResult:
    """Run ``train.py`` with the command-line arguments `argv` (default: ``sys.argv``).

    `record_drops` keeps what each step's gates kept (``Training.last_active``) in the result (for tests).
    """
    args = parse_args(argv)
    recipe = Recipe.from_dict(vars(args))
    processes = start_processes(args.device)
    try:
        return train(recipe, args, processes, record_drops=record_drops)
    finally:
        if processes.distributed and dist.is_initialized():
            dist.destroy_process_group()


def train(recipe: Recipe, args: argparse.Namespace, processes: Processes, *, record_drops: bool = False) -> RunResult:
    """Train `recipe`'s model, or resume its run, until its last epoch or ``--max-steps``.

    `args` gives the run options (:func:`parse_args`' namespace; its recipe fields are not
    read here). Each epoch: its steps (:func:`train_epoch`), BatchNorm statistics made equal
    across processes, evaluation and the epoch's record (:func:`end_epoch`), the lr schedule's
    epoch step, then a checkpoint and the metrics files. A run stopped inside an epoch saves the
    epoch's progress with its checkpoint and resumes it exactly. `record_drops` keeps each
    step's ``Training.last_active()`` in the result.

    Raises FileExistsError, FileNotFoundError or ValueError (see :func:`checkpoint_to_resume`
    and :func:`load_data`), and FloatingPointError at a non-finite training loss.
    """
    output_dir = Path(args.output_dir)
    checkpoint = checkpoint_to_resume(recipe, args, processes)
    data = load_data(recipe, args, processes)
    training = build_training(recipe, args, processes, data)
    step, records, progress = 0, [], EpochProgress()
    if checkpoint is not None:
        step, records, progress = restore_checkpoint(checkpoint, training, data.batches)
        if not processes.is_main:  # the checkpoint's epoch totals are all processes' (see below): count them once
            progress = replace(progress, totals=torch.zeros(2), images_seen=0)

    config = {**vars(args), **asdict(recipe), "world_size": processes.world_size, "device": str(processes.device),
              "parameters": sum(p.numel() for p in training.model.parameters()), "torch": torch.__version__}  # fmt: skip
    steps_per_epoch = data.steps_per_epoch
    total_steps = recipe.epochs * steps_per_epoch
    stop_at = min(total_steps, args.max_steps or total_steps)
    if processes.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        print(start_up_line(recipe, config["parameters"], processes, steps_per_epoch, stop_at), flush=True)

    drops: list[Tensor] | None = [] if record_drops else None
    bar = tqdm(total=stop_at, initial=step, disable=not (processes.is_main and args.progress), unit="step", dynamic_ncols=True)
    while step < stop_at:
        epoch = step // steps_per_epoch  # 0-based
        epoch_end = (epoch + 1) * steps_per_epoch
        train_epoch(recipe, args, processes, data, training, range(step, min(epoch_end, stop_at)), progress, bar, drops)
        step = min(epoch_end, stop_at)
        if step < epoch_end:  # stopped by --max-steps inside the epoch
            # Rank 0 writes the checkpoint alone, so it saves the epoch's totals over all processes.
            everyone = progress.summed_over(processes)
            if processes.is_main:
                save_checkpoint(output_dir / "checkpoint.pt", recipe, training, data.batches, step, records, everyone)
            break
        records.append(end_epoch(recipe, args, processes, data, training, epoch, progress, last=step == total_steps))
        progress = EpochProgress()
        if recipe.schedule_unit == "epoch":
            training.scheduler.step()
        if processes.is_main:
            save_checkpoint(output_dir / "checkpoint.pt", recipe, training, data.batches, step, records, None)
            write_metrics(output_dir, records, summarise(records), config)
            tqdm.write(epoch_line(records[-1], recipe.epochs))
    bar.close()

    summary = summarise(records)
    if processes.is_main and records:
        write_metrics(output_dir, records, summary, config)
    if processes.is_main:
        if step == total_steps:
            print(f"train.py: done; {json.dumps(summary)}", flush=True)
        elif records:
            print(f"train.py: stopped after step {step} of {total_steps} (--max-steps), in epoch {step // steps_per_epoch + 1} "
                  f"of {recipe.epochs}; {json.dumps(summary)}", flush=True)
        else:
            print(f"train.py: stopped after step {step} of {total_steps} (--max-steps), inside the first epoch "
                  f"({steps_per_epoch} steps): {output_dir / 'checkpoint.pt'} written, no metrics.json yet (it is "
                  "written at the end of each epoch); --resume continues the run", flush=True)
    return RunResult(records, summary, training.model, step, drops)


def start_up_line(recipe: Recipe, parameters: int, processes: Processes, steps_per_epoch: int, stop_at: int) -> str:
    """What train.py prints first: the data, the model, the drops (with a schedule's switch step), the optimiser
    where it is not the paper's, and the processes."""
    if recipe.model == "vit":
        network = (f"ViT of {recipe.vit_layers} blocks, width {recipe.vit_width}, {recipe.vit_heads} heads, "
                   f"{recipe.vit_patch}x{recipe.vit_patch} patches")  # fmt: skip
        model_text = "plain" if recipe.plain else f"stochastic depth drop_path_rate={recipe.drop_path_rate}, row_subset"
    else:
        network = f"ResNet-{recipe.depth}"
        model_text = "plain" if recipe.plain else f"stochastic depth p_L={recipe.p_last}"
    total_steps = recipe.epochs * steps_per_epoch
    notes = ""
    if recipe.drop_schedule != "constant" and not recipe.plain:
        switch = math.floor(recipe.drop_switch * total_steps)
        model_text += (f", {recipe.drop_schedule} drops: {'stop' if recipe.drop_schedule == 'early' else 'start'} at step "
                       f"{switch:,} of {total_steps:,} (--drop-switch {recipe.drop_switch:g} of all the steps)")
        if stop_at <= switch:
            never = "drops throughout" if recipe.drop_schedule == "early" else "drops nothing"
            notes = (f"\ntrain.py: note: --max-steps stops at step {stop_at:,}, before the switch at step {switch:,}: "
                     f"this run {never}")
    if (recipe.optimizer, recipe.lr_schedule) != ("sgd", "step"):
        model_text += f", {recipe.optimizer} lr {recipe.lr:g} wd {recipe.weight_decay:g}, {recipe.lr_schedule} schedule"
    return (f"train.py: {recipe.dataset}, {network} ({parameters:,} parameters), {model_text}, "
            f"{processes.world_size} process(es) on {processes.device}, {steps_per_epoch} steps per epoch, "
            f"{recipe.epochs} epochs{notes}")


def train_epoch(
    recipe: Recipe, args: argparse.Namespace, processes: Processes, data: Data, training: Training, steps: range,
    progress: EpochProgress, bar: tqdm, drops: list[Tensor] | None,
) -> None:
    """Take the optimizer `steps` (0-based, of one epoch), adding to `progress`.

    Every ``--log-every`` steps and at the last one, the losses since the previous check are
    averaged over the processes, checked and shown on `bar`. `drops`, if a list, gets each
    step's ``Training.last_active()``: (blocks,) bool for a ResNet, (2 * blocks, batch) for a ViT (its
    attention and MLP gates, per sample). Raises FloatingPointError naming the first step
    whose loss is not finite.
    """
    model, epoch = training.model, steps.start // data.steps_per_epoch
    progress.totals = progress.totals.to(processes.device)
    pending: list[Tensor] = []  # losses not yet checked, kept on the device: no synchronisation per step
    synchronize(processes.device)
    start = time.perf_counter()
    for step in steps:
        images, labels = data.next_share(step, processes)
        if training.stochastic:  # draws keyed by the step: the same blocks in every process (a ViT: each its samples)
            set_step(model, step)
            if recipe.drop_schedule != "constant":
                stochastic_depth_state(model).drop_scale = drop_scale(recipe, step, recipe.epochs * data.steps_per_epoch)
        with warmup_lr(training.optimizer, recipe.warmup_lr, step, recipe.warmup_steps, recipe.warmup_shape):
            loss, logits = training_step(training.network, training.optimizer, training.scaler, training.autocast,
                                         images, labels, training.set_to_none)  # fmt: skip
        if recipe.schedule_unit == "step":
            training.scheduler.step()
        with torch.no_grad():
            progress.totals[0] += loss.detach().float() * len(labels)
            progress.totals[1] += (logits.argmax(1) != labels).sum()
        progress.images_seen += len(labels)
        pending.append(loss.detach().float())
        if training.stochastic:
            last_active = training.last_active()
            progress.active_blocks += training.active_blocks(last_active)
            if drops is not None:
                drops.append(last_active)
        if len(pending) == args.log_every or step == steps[-1]:
            losses = _all_reduce_sum(torch.stack(pending), processes) / processes.world_size
            bad = (~torch.isfinite(losses)).nonzero()
            if len(bad):
                first_bad = step - len(pending) + int(bad[0]) + 2  # 1-based
                raise FloatingPointError(
                    f"training loss is {losses[bad[0]].item()} at optimizer step {first_bad} (epoch {epoch + 1}); "
                    f"stopped; the last checkpoint in {args.output_dir} is from before it"
                )
            bar.update(len(pending))
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1].item():.3f}", refresh=False)
            pending = []
    synchronize(processes.device)
    progress.seconds += time.perf_counter() - start


def end_epoch(
    recipe: Recipe, args: argparse.Namespace, processes: Processes, data: Data, training: Training, epoch: int,
    progress: EpochProgress, *, last: bool,
) -> dict[str, Any]:
    """The record of finished 0-based `epoch` (:data:`METRIC_COLUMNS`), the same in every process.

    Gives every process rank 0's BatchNorm statistics, then evaluates on the validation and
    test sets every ``--eval-every`` epochs and at the `last` (their losses and errors are None
    otherwise, and the validation ones without a validation set). Training loss and error are
    over all processes' images; losses are mean cross-entropies (nats), errors fractions.
    """
    model = training.model
    start = time.perf_counter()
    _share_batchnorm_statistics(model, processes)
    val_loss = val_error = test_loss = test_error = None
    if (epoch + 1) % recipe.eval_every == 0 or last:
        options = dict(batch_size=args.eval_batch_size, autocast=training.autocast)
        if len(data.val.labels):
            val_loss, val_error = evaluate(model, data.val, data.preprocess, processes, **options)
        test_loss, test_error = evaluate(model, data.test, data.preprocess, processes, **options)
    everyone = progress.summed_over(processes)
    (loss_sum, errors), count = everyone.totals.tolist(), everyone.images_seen
    return {
        "epoch": epoch + 1, "step": (epoch + 1) * data.steps_per_epoch, "lr": training.optimizer.param_groups[0]["lr"],
        "train_loss": loss_sum / count, "train_error": errors / count,
        "val_loss": val_loss, "val_error": val_error, "test_loss": test_loss, "test_error": test_error,
        "epoch_time_s": progress.seconds, "eval_time_s": time.perf_counter() - start,
        "mean_active_blocks": progress.active_blocks / data.steps_per_epoch if training.stochastic else float(len(model.blocks)),
    }  # fmt: skip


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """The line shown after each epoch."""
    val_text = "" if record["val_error"] is None else f"val error {100 * record['val_error']:.2f}%, "
    test_text = "" if record["test_error"] is None else f"test error {100 * record['test_error']:.2f}%, "
    return (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}, {val_text}{test_text}"
            f"{record['epoch_time_s']:.1f} s")  # fmt: skip


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, FloatingPointError, ValueError) as error:  # say what, not where
        sys.exit(f"train.py: error: {error}")
