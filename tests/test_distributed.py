"""FSDP2 (stochastic_depth.distributed) and DDP of converted models, on two gloo processes on the CPU.

Each test spawns two processes once and checks several things in them (a spawn costs seconds
of imports on a slow machine). The reference for "what the processes should compute" is one
process trained on both processes' images at once. The DDP tests of StochasticResNet with uneven
inputs under join() start their processes with torch.multiprocessing.spawn.
"""

import math
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_library_blocks import HUGGING_FACE
from test_resnet_with_stochastic_depth import batch
from timm.models.convnext import ConvNeXt as TimmConvNeXt
from timm.models.vision_transformer import Block as TimmViTBlock
from timm.models.vision_transformer import VisionTransformer
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.efficientnet import EfficientNet, MBConvConfig
from torchvision.models.swin_transformer import SwinTransformer

from benchmarks.counters import collective_bytes
from resnet_with_stochastic_depth import (
    StochasticResNet,
    add_stochastic_depth,
    set_step,
    stochastic_depth_gates,
    stochastic_depth_state,
)
from stochastic_depth.distributed import (
    branch_modules,
    data_parallel,
    fully_shard_stochastic_depth,
    gated_blocks,
    get_checkpoint_state,
    set_checkpoint_state,
)

WORLD = 2
RATE = 0.4
SEED = 7
STEPS = 6
BATCH = 4  # images per process per step
MICRO = 2  # micro-batches per optimizer step, where there are


def tiny_vit(mode="batch", convert=True, rate=RATE, seed=SEED):
    """timm ViT, patch 8 on 32x32 images, 4 blocks (8 gates); the same weights at every call."""
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2, drop_path_rate=rate, num_classes=10,
    )
    return add_stochastic_depth(model, mode=mode, seed=seed) if convert else model


def images(step, rank, n=BATCH, size=32, channels=3):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(10, (n,), generator=g)


def spawn(worker, *args):
    """Run `worker(rank, *args)` on two gloo processes; return [result of rank 0, of rank 1].

    The processes are forked from a fork server that imported this module once, which spares
    each the seconds of importing torch, torchvision and timm again. Not forked from pytest's
    own process: after a test there has run autograd (or torch.compile) threads, a fork fails
    ("Unable to handle autograd's threading in combination with fork-based multiprocessing").
    """
    import tempfile

    mp.set_forkserver_preload([__name__])
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_process, args=(tmp, worker, args), nprocs=WORLD, start_method="forkserver")
        return [torch.load(f"{tmp}/{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _process(rank, tmp, worker, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.save(worker(rank, *args), f"{tmp}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def _plain_name(name):
    return name.replace("_checkpoint_wrapped_module.", "")


def _padded_bytes(params, element_size=4):
    """Bytes FSDP2 all-gathers for `params`: each padded to a multiple of WORLD rows (dim 0)."""
    return sum(math.ceil(p.shape[0] / WORLD) * WORLD * p[0].numel() * element_size for p in params)


# ---------------------------------------------------------------------------------- FSDP2


def _fsdp_units(model):
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    return list({id(u._get_fsdp_state()): u._get_fsdp_state() for u in units}.values())


def _shard(model, config):
    if config.get("checkpoint"):
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, TimmViTBlock))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if config.get("bf16") else None
    return fully_shard_stochastic_depth(model, mp_policy=policy)


def _fsdp_worker(rank, config):
    """Trains the sharded tiny ViT for STEPS SGD steps; returns what each step did and the final parameters."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    torch.manual_seed(100 + rank)  # a different global RNG on each process: the gates must not depend on it
    rate = config.get("rate", RATE)
    model = _shard(tiny_vit(config["mode"], rate=rate), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if config.get("prefetch_last_block"):
        # A static explicit prefetch of the last block's two branch units, from the root.
        last = gated_blocks(model)[-1]
        model.set_modules_to_forward_prefetch([children[0] for children in branch_modules(last).values()])
    steps = []
    for step in range(STEPS):
        if step == config.get("resume_at"):
            # Save as a run would (full state dict on the CPU, optimizer, gates), and go on with a new model.
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            saved = {
                "model": get_model_state_dict(model, options=options),
                "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
                "gates": stochastic_depth_state(model).get_state(),
            }
            # The new model's gates get another seed: set_state must bring back the run's.
            torch.manual_seed(555)
            model = _shard(tiny_vit(config["mode"], rate=rate, seed=SEED + 1), config)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            # (only rank 0 holds the full state dicts, as cpu_offload gives them: it sends them out)
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(model, saved["model"], options=options)
            set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=options)
            stochastic_depth_state(model).set_state(saved["gates"])
        set_step(model, step)
        x, y = images(step, rank)
        optimizer.zero_grad(set_to_none=True)
        with collective_bytes() as sent:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        active = [bool(g.last_active.all()) for g in stochastic_depth_gates(model)]
        none_kept = sum(not g.last_active.any() for g in stochastic_depth_gates(model))
        no_grad = sorted(_plain_name(n) for n, p in model.named_parameters() if p.grad is None)
        optimizer.step()
        states = _fsdp_units(model)
        groups = [g for s in states for g in s._fsdp_param_groups]
        steps.append({
            "loss": loss.item(), "active": active, "no_grad": no_grad, "none_kept": none_kept,
            "all_gathered": sent.all_gathered, "reduce_scattered": sent.reduce_scattered,
            "all_gather_calls": sent.calls["all_gathered"],
            "all_sharded_and_idle": all(g.is_sharded and g._training_state.name == "IDLE" for g in groups),
            "pending_reduce_scatters": sum(len(s._comm_ctx.reduce_scatter_states) for s in states),
        })
    params = {_plain_name(n): p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return {"steps": steps, "params": params}


def _checkpoint_worker(rank, optimizer_name, resume_at):
    """A converted timm ViT at drop rate 0.8 under fully_shard_stochastic_depth, 8 steps, saved with
    get_checkpoint_state at `resume_at` (None: not at all) and resumed with set_checkpoint_state into a
    newly built model with other gate seeds; returns each step's drops and the final parameters."""
    import tempfile

    def make_optimizer(model):
        if optimizer_name == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=1e-2)
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    model = fully_shard_stochastic_depth(tiny_vit("batch", rate=0.8))
    optimizer = make_optimizer(model)
    active = []
    with tempfile.TemporaryDirectory() as tmp:
        for step in range(8):
            if step == resume_at:
                state = get_checkpoint_state(model, optimizer)
                path = [f"{tmp}/checkpoint.pt"]
                dist.broadcast_object_list(path, src=0)  # (one file, written by rank 0)
                if rank == 0:
                    torch.save(state, path[0])
                dist.barrier()
                model = fully_shard_stochastic_depth(tiny_vit("batch", rate=0.8, seed=SEED + 1))
                optimizer = make_optimizer(model)
                set_checkpoint_state(model, optimizer, torch.load(path[0], weights_only=False) if rank == 0 else None)
            set_step(model, step)
            x, y = images(step, rank)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            active.append([bool(g.last_active) for g in stochastic_depth_gates(model)])
    params = {_plain_name(n): p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return {"active": active, "params": params}


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
def test_get_and_set_checkpoint_state_resume_exactly_also_before_a_branch_first_ran(optimizer_name):
    whole = spawn(_checkpoint_worker, optimizer_name, None)
    resumed = spawn(_checkpoint_worker, optimizer_name, 2)
    # At drop rate 0.8 some branches never ran in steps 0-1: they had no optimizer state when saved.
    ran_before = [any(step[i] for step in whole[0]["active"][:2]) for i in range(8)]
    assert not all(ran_before)
    assert whole[0]["active"] == whole[1]["active"] == resumed[0]["active"] == resumed[1]["active"]
    for name, value in whole[0]["params"].items():
        torch.testing.assert_close(resumed[0]["params"][name], value, rtol=0, atol=1e-6, msg=name)


def test_get_and_set_checkpoint_state_work_on_one_process_without_torch_distributed():
    def run(resume_at):
        torch.manual_seed(0)
        model = StochasticResNet.cifar(14, survival_rule="uniform", p_last=0.3, seed=SEED)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(6):
            if step == resume_at:
                state = get_checkpoint_state(model, optimizer)
                model = StochasticResNet.cifar(14, survival_rule="uniform", p_last=0.3, seed=SEED + 1)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
                set_checkpoint_state(model, optimizer, state)
            set_step(model, step)
            x, y = batch(4, size=8, seed=step)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            ran.append(model.active_blocks.clone())
        return model

    ran = []
    whole = run(None)
    assert not torch.stack(ran[:2]).any(0).all()  # a block that had not run when the checkpoint was taken
    ran.clear()
    resumed = run(2)
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def _single_process_reference(mode="batch"):
    """One process, the same model, on both processes' images at once: parameters after STEPS steps."""
    model = tiny_vit(mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    active = []
    for step in range(STEPS):
        set_step(model, step)
        x, y = (torch.cat(t) for t in zip(*(images(step, rank) for rank in range(WORLD))))
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        active.append([bool(g.last_active) for g in stochastic_depth_gates(model)])
    return dict(model.named_parameters()), active


def _unit_bytes(element_size=4):
    """Bytes all-gathered per gate's branch unit, and for the root unit (everything else), for tiny_vit."""
    model = tiny_vit()
    branches = [children for block in gated_blocks(model) for children in branch_modules(block).values()]
    branch_bytes = [_padded_bytes([p for m in children for p in m.parameters()], element_size) for children in branches]
    in_branches = {id(p) for children in branches for m in children for p in m.parameters()}
    root_bytes = _padded_bytes([p for p in model.parameters() if id(p) not in in_branches], element_size)
    return branch_bytes, root_bytes


def _check_batch_mode_run(results, config):
    reference, reference_active = _single_process_reference()
    branch_bytes, root_bytes = _unit_bytes(2 if config.get("bf16") else 4)
    vit = tiny_vit()
    names = {id(p): n for n, p in vit.named_parameters()}
    branch_params = [  # parameter names of each gate's branch, in gate order
        {names[id(p)] for m in children for p in m.parameters()}
        for block in gated_blocks(vit) for children in branch_modules(block).values()
    ]
    for rank, result in enumerate(results):
        for step, record in enumerate(result["steps"]):
            # The same branches as one process at that step, on both processes.
            assert record["active"] == reference_active[step] == results[0]["steps"][step]["active"], (rank, step)
            # Root once (FSDP2 does not reshard the root after forward), each kept branch twice
            # (forward and backward), a dropped one never; its gradients reduce-scattered never.
            kept = sum(b for b, a in zip(branch_bytes, record["active"]) if a)
            assert record["all_gathered"] == root_bytes + 2 * kept, (rank, step)
            assert record["reduce_scattered"] == (root_bytes + kept) * (2 if config.get("bf16") else 1), (rank, step)
            # A dropped branch's parameters keep grad None (the optimizer skips them); FSDP2 is
            # left with every unit sharded, idle and no reduce-scatter pending.
            dropped = {i for i, a in enumerate(record["active"]) if not a}
            in_branches = set().union(*branch_params)
            assert {n for n in record["no_grad"] if n in in_branches} == set().union(*(branch_params[i] for i in dropped))
            assert record["all_sharded_and_idle"] and record["pending_reduce_scatters"] == 0
    assert not all(all(r["active"]) for r in results[0]["steps"])  # some branches were dropped
    # Expected fraction of plain FSDP2's all-gathered bytes (every block each step), and what was gathered.
    survival = [g.survival_prob for g in stochastic_depth_gates(tiny_vit())]
    plain = root_bytes + 2 * sum(branch_bytes)
    expected = (root_bytes + 2 * sum(p * b for p, b in zip(survival, branch_bytes))) / plain
    measured = sum(r["all_gathered"] for r in results[0]["steps"]) / len(results[0]["steps"]) / plain
    # (0.869 measured against 0.820 expected: these 6 steps kept more branches than the average.
    # The exact count per step above is what shows that nothing else is gathered.)
    assert measured <= expected + 0.05, (measured, expected)
    return reference


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "activation-checkpointing"])
def test_fsdp2_batch_mode_skips_dropped_branches_and_equals_one_process(checkpoint):
    config = {"mode": "batch", "checkpoint": checkpoint}
    results = spawn(_fsdp_worker, config)
    reference = _check_batch_mode_run(results, config)
    for rank, result in enumerate(results):
        for name, value in reference.items():
            torch.testing.assert_close(result["params"][name], value.detach(), rtol=0, atol=2e-5, msg=f"{rank} {name}")


def test_fsdp2_resumed_from_a_full_state_dict_continues_the_same_drops_and_parameters():
    results = spawn(_fsdp_worker, {"mode": "batch", "resume_at": 3})
    reference = _check_batch_mode_run(results, {})
    for name, value in reference.items():
        torch.testing.assert_close(results[0]["params"][name], value.detach(), rtol=0, atol=2e-5, msg=name)


def test_fsdp2_bf16_parameters_gather_half_the_bytes_and_track_float32():
    config = {"mode": "batch", "bf16": True}
    results = spawn(_fsdp_worker, config)
    reference = _check_batch_mode_run(results, config)
    worst = max((results[0]["params"][n] - v.detach()).abs().max().item() for n, v in reference.items())
    assert worst < 1e-2, worst  # (2.5e-3 measured) bf16 forward and backward; float32 parameters and reduction


@pytest.mark.parametrize("mode", ["row_subset", "row"])
def test_fsdp2_row_modes_train_with_every_block_gathered(mode):
    # Drop rate 0.9 in "row": a branch that keeps none of a process's 4 samples is not called
    # there, while the other process calls it; its unit must still reduce-scatter alike.
    results = spawn(_fsdp_worker, {"mode": mode, "rate": 0.9 if mode == "row" else RATE})
    if mode == "row":
        assert any(record["none_kept"] for result in results for record in result["steps"])
    branch_bytes, root_bytes = _unit_bytes()
    for result in results:
        for record in result["steps"]:
            assert math.isfinite(record["loss"])
            assert record["all_gathered"] == root_bytes + 2 * sum(branch_bytes)
            assert record["all_sharded_and_idle"] and record["pending_reduce_scatters"] == 0
    # The parameters are one set (sharded), and they moved.
    start = dict(tiny_vit(mode).named_parameters())  # (the same weights at any rate)
    assert all(torch.equal(results[0]["params"][n], results[1]["params"][n]) for n in start)
    assert all(not torch.equal(results[0]["params"][n], p) for n, p in start.items() if n.endswith("weight"))


def test_fsdp2_explicit_forward_prefetch_of_a_branch_gathers_it_also_when_dropped():
    # What the docs warn about: a static prefetch list cannot know the step's drops.
    results = spawn(_fsdp_worker, {"mode": "batch", "prefetch_last_block": True})
    branch_bytes, root_bytes = _unit_bytes()
    extra_steps = 0
    for result in results:
        for record in result["steps"]:
            kept = sum(b for b, a in zip(branch_bytes, record["active"]) if a)
            wasted = sum(b for b, a in zip(branch_bytes[-2:], record["active"][-2:]) if not a)
            assert record["all_gathered"] == root_bytes + 2 * kept + wasted
            assert record["reduce_scattered"] == root_bytes + kept  # no gradient of it is sent
            assert record["all_sharded_and_idle"] and record["pending_reduce_scatters"] == 0
            extra_steps += wasted > 0
    assert extra_steps > 0
    reference, _ = _single_process_reference()
    for name, value in reference.items():
        torch.testing.assert_close(results[1]["params"][name], value.detach(), rtol=0, atol=2e-5, msg=name)


def _fsdp_accumulation_worker(rank):
    """3 steps of MICRO micro-batches, each its own sub-network, gradients reduce-scattered at the last only."""
    torch.manual_seed(100 + rank)
    model = fully_shard_stochastic_depth(tiny_vit())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    active = []
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(MICRO):
            model.set_requires_gradient_sync(micro == MICRO - 1)
            set_step(model, step, micro)
            x, y = images(10 * step + micro, rank)
            F.cross_entropy(model(x), y).backward()
            active.append([bool(g.last_active) for g in stochastic_depth_gates(model)])
        optimizer.step()
    return {"active": active, "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}}


def _one_process_step(model, step):
    """Every process's micro-batches of `step` run on one process, each micro-batch with the
    step's sub-network: the gradient is then the mean over processes of each process's sum, as
    DDP's and FSDP's is. Returns the gates' decisions, a list per micro-batch."""
    active = []
    for micro in range(MICRO):
        set_step(model, step, micro)
        for rank in range(WORLD):
            x, y = images(10 * step + micro, rank)
            (F.cross_entropy(model(x), y) / WORLD).backward()
        active.append([bool(g.last_active) for g in stochastic_depth_gates(model)])
    return active


def test_fsdp2_gradient_accumulation_with_a_sub_network_per_micro_batch_equals_one_process():
    # A branch kept in a step's first micro-batch and dropped in its last must still have its
    # accumulated gradient reduce-scattered (what DDP missed before torch 2.4, pytorch #69031).
    results = spawn(_fsdp_accumulation_worker)
    model = tiny_vit()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    active = []
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        active += _one_process_step(model, step)
        optimizer.step()
    assert results[0]["active"] == results[1]["active"] == active
    assert any(first and not last for a, b in zip(active[::2], active[1::2]) for first, last in zip(a, b))
    for name, value in model.named_parameters():
        torch.testing.assert_close(results[0]["params"][name], value.detach(), rtol=0, atol=2e-5, msg=name)


def _mismatched_seed_worker(rank, wrap, differ):
    if differ == "seed":
        model = add_stochastic_depth(tiny_vit(convert=False), seed=rank)
    else:  # a drop rate per process
        model = add_stochastic_depth(tiny_vit(convert=False), p_last=0.5 + 0.1 * rank, seed=SEED)
    try:
        (fully_shard_stochastic_depth if wrap == "fsdp2" else data_parallel)(model)
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.parametrize("differ", ["seed", "survival_prob"])
@pytest.mark.parametrize("wrap", ["fsdp2", "ddp"])
def test_processes_whose_gates_differ_are_refused(wrap, differ):
    # Under DDP they would silently train different sub-networks (a new user's run: parameters
    # equal, drops different); under FSDP2 abort in gloo or pair shards of different blocks.
    messages = spawn(_mismatched_seed_worker, wrap, differ)
    wrapper, consequence = {"fsdp2": ("fully_shard_stochastic_depth", "all-gathers"),
                            "ddp": ("data_parallel", "different sub-networks")}[wrap]
    for m in messages:
        assert m is not None and m.startswith(wrapper) and consequence in m and "same seed=" in m, m
        assert f"{differ} " in m, m  # names what differs


def _row_subset_only_worker(rank):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fully_shard_stochastic_depth(add_stochastic_depth(tiny_vit(convert=False), seed=SEED))  # row_subset
    return [str(w.message) for w in caught]


def test_fsdp2_of_a_model_without_batch_mode_gates_warns_that_nothing_is_saved():
    for messages in spawn(_row_subset_only_worker):
        assert any("no gate of VisionTransformer is in batch mode" in m and "mode='batch'" in m for m in messages)


def test_branch_modules_of_each_family():
    vit = tiny_vit()
    block = gated_blocks(vit)[0]
    assert branch_modules(block) == {"drop_path1": [block.norm1, block.attn], "drop_path2": [block.norm2, block.mlp]}
    swin = add_stochastic_depth(FAMILIES["torchvision Swin"](), seed=0)
    block = gated_blocks(swin)[0]
    assert branch_modules(block) == {"stochastic_depth_attn": [block.norm1, block.attn], "stochastic_depth_mlp": [block.norm2, block.mlp]}
    convnext = add_stochastic_depth(FAMILIES["timm ConvNeXt"](), seed=0)
    block = gated_blocks(convnext)[0]
    assert branch_modules(block) == {"drop_path": [block.conv_dw, block.norm, block.mlp]}  # gamma stays with the block
    resnet = StochasticResNet.cifar(8, seed=0)
    block = gated_blocks(resnet)[1]
    assert branch_modules(block) == {"stochastic_depth": [block.conv1, block.bn1, block.conv2, block.bn2]}
    with pytest.raises(TypeError, match="no StochasticDepth gates"):
        fully_shard_stochastic_depth(tiny_vit(convert=False))


# ---------------------------------------------------------------------------------- DDP, every family


FAMILIES = {
    "timm ViT": tiny_vit,
    "timm ConvNeXt": lambda: TimmConvNeXt(depths=(1, 1, 2, 1), dims=(8, 8, 16, 16), drop_path_rate=RATE, num_classes=10),
    "torchvision ConvNeXt": lambda: ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 2)], stochastic_depth_prob=RATE, num_classes=10),
    "torchvision Swin": lambda: SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
        stochastic_depth_prob=RATE, num_classes=10,
    ),
    "torchvision EfficientNet": lambda: EfficientNet(
        [MBConvConfig(1, 3, 1, 8, 8, 2), MBConvConfig(2, 3, 2, 8, 16, 2)], dropout=0.0, stochastic_depth_prob=RATE,
        num_classes=10, last_channel=32,
    ),
    **HUGGING_FACE,
}


def _family(name, mode):
    torch.manual_seed(0)
    model = FAMILIES[name]()
    if name != "timm ViT":
        add_stochastic_depth(model, mode=mode, seed=SEED)
    else:
        model = tiny_vit(mode)
    return model


def _ddp_worker(rank, name):
    """Batch mode: 3 steps of MICRO micro-batches under no_sync, each micro-batch its own sub-network; then row mode."""
    torch.manual_seed(100 + rank)
    model = _family(name, "batch")
    ddp = data_parallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    records = []
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        active = []
        for micro in range(MICRO):
            set_step(model, step, micro)  # a sub-network per micro-batch: the unused parameters change
            x, y = images(10 * step + micro, rank)
            context = ddp.no_sync() if micro < MICRO - 1 else torch.enable_grad()
            with context:
                F.cross_entropy(ddp(x), y).backward()
            active.append([bool(g.last_active) for g in stochastic_depth_gates(model)])
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        records.append({"active": active, "grads": grads})
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    row = _family(name, "row_subset")
    row_ddp = data_parallel(row)
    row_active = []
    for step in range(3):
        set_step(row, step)
        x, y = images(step, rank)
        F.cross_entropy(row_ddp(x), y).backward()
        row_active.append(torch.stack([g.last_active for g in stochastic_depth_gates(row)]))
    return {"records": records, "params": params, "row_active": row_active,
            "row_params": [p.detach().clone() for p in row.parameters()]}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_ddp_of_each_family_drops_alike_and_accumulates_as_one_process(name):
    results = spawn(_ddp_worker, name)
    # One process with the same weights runs every process's micro-batches of a step with the
    # step's sub-networks; DDP's gradient is the mean over processes of each process's sum.
    model = _family(name, "batch")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        active = _one_process_step(model, step)
        assert results[0]["records"][step]["active"] == results[1]["records"][step]["active"] == active
        for rank in range(WORLD):
            for n, p in model.named_parameters():
                got = results[rank]["records"][step]["grads"][n]
                if p.grad is None:  # unused by every micro-batch: DDP gives zeros (or leaves None)
                    assert got is None or not got.any(), n
                else:
                    torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-5, msg=f"{name} {rank} {step} {n}")
        optimizer.step()
    steps_active = [a for r in results[0]["records"] for a in r["active"]]
    assert not all(all(a) for a in steps_active)  # some branches dropped
    # A branch used in a step's first micro-batch and dropped in its last, which DDP synchronised
    # only since torch 2.4 (pytorch #69031, composer #9: stochastic depth trained badly).
    assert any(first and not last for r in results[0]["records"] for first, last in zip(*r["active"]))
    for n, p in model.named_parameters():
        assert torch.equal(results[0]["params"][n], results[1]["params"][n]), n
        torch.testing.assert_close(results[0]["params"][n], p.detach(), rtol=1e-4, atol=1e-5, msg=n)
    # Row mode: each process draws its own samples; the parameters stay equal.
    assert any(not torch.equal(a, b) for a, b in zip(results[0]["row_active"], results[1]["row_active"]))
    assert all(torch.equal(a, b) for a, b in zip(results[0]["row_params"], results[1]["row_params"]))


def _static_graph_worker(rank):
    model = tiny_vit()
    try:
        data_parallel(model, static_graph=True)
    except ValueError as error:
        return str(error)
    return None


def test_ddp_static_graph_is_refused_with_a_clear_error():
    messages = spawn(_static_graph_worker)
    assert all(m is not None and "static_graph=True" in m and "static_graph=False" in m for m in messages)


# ---------------------------------------------------------------------------------- FSDP2, every family

FSDP_FAMILIES = [*FAMILIES, "ResNet (this project's)"]
LAYER_NORM = {"timm ViT", "timm ConvNeXt", "torchvision ConvNeXt", "torchvision Swin", "transformers DINOv2", "transformers Swin"}


def _fsdp_family(name):
    if name == "ResNet (this project's)":
        torch.manual_seed(0)
        return StochasticResNet.cifar(8, in_channels=3, num_classes=10, p_last=0.5, seed=SEED)
    return _family(name, "batch")


def _expected_all_gathered(model, active):
    """The bytes the recipe all-gathers in a step with these gates kept: the root once, each block's
    own unit and each kept branch's unit twice (forward, and backward after resharding)."""
    gates = stochastic_depth_gates(model)
    total, in_units = 0, set()
    for block in gated_blocks(model):
        branches = branch_modules(block)
        branch_ids = set()
        for gate_name, children in branches.items():
            params = [p for m in children for p in m.parameters()]
            branch_ids |= {id(p) for p in params}
            if active[gates.index(getattr(block, gate_name))]:
                total += 2 * _padded_bytes(params)
        own = [p for p in block.parameters() if id(p) not in branch_ids and id(p) not in in_units]
        total += 2 * _padded_bytes(own)
        in_units |= {id(p) for p in block.parameters()}
    return total + _padded_bytes([p for p in model.parameters() if id(p) not in in_units])


def _fsdp_family_worker(rank, name):
    torch.manual_seed(100 + rank)
    model = fully_shard_stochastic_depth(_fsdp_family(name))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    steps = []
    for step in range(3):
        set_step(model, step)
        x, y = images(step, rank)
        optimizer.zero_grad(set_to_none=True)
        with collective_bytes() as sent:
            F.cross_entropy(model(x), y).backward()
        optimizer.step()
        groups = [g for s in _fsdp_units(model) for g in s._fsdp_param_groups]
        steps.append({"active": [bool(g.last_active) for g in stochastic_depth_gates(model)],
                      "all_gathered": sent.all_gathered, "all_sharded": all(g.is_sharded for g in groups)})
    return {"steps": steps, "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("name", FSDP_FAMILIES)
def test_fsdp2_of_each_family_gathers_only_the_kept_branches(name):
    results = spawn(_fsdp_family_worker, name)
    model = _fsdp_family(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        set_step(model, step)
        x, y = (torch.cat(t) for t in zip(*(images(step, rank) for rank in range(WORLD))))
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        active = [bool(g.last_active) for g in stochastic_depth_gates(model)]
        for result in results:
            assert result["steps"][step]["active"] == active
            assert result["steps"][step]["all_gathered"] == _expected_all_gathered(model, active), step
            assert result["steps"][step]["all_sharded"]
    assert not all(all(r["active"]) for r in results[0]["steps"])
    if name in LAYER_NORM:  # (BatchNorm normalises over each process's images, not over both processes')
        for n, p in model.named_parameters():
            torch.testing.assert_close(results[0]["params"][n], p.detach(), rtol=0, atol=2e-5, msg=n)


# ---------------------------------------------------------------------------------- DDP of StochasticResNet, uneven inputs


def _uneven_ddp_worker(rank, world_size, init_file, mode, stepped, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(100 + rank)  # a different global RNG on each rank, as timm's train.py (seed + rank)
    model = StochasticResNet.cifar(14, mode=mode, p_last=0.5, seed=1234)  # the same weights come from rank 0
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    drops = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Epoch 0 is uneven (process 0 has 3 batches, process 1 has 2) under join(); then
        # process 0 runs one extra training-mode forward pass; epoch 1 is even.
        for epoch, batches in enumerate([3 - rank, 2]):
            with ddp.join():
                for i in range(batches):
                    if stepped:
                        set_step(model, epoch, i)
                    x, y = batch(16, seed=10 * epoch + i + 1000 * rank)  # different data on each rank
                    optimizer.zero_grad(set_to_none=True)
                    F.cross_entropy(ddp(x), y).backward()
                    optimizer.step()
                    drops[epoch, i] = model.active_blocks.clone()
            if rank == 0 and epoch == 0:
                with torch.no_grad():
                    model(batch(16)[0])
    warned = any("without set_step" in str(w.message) for w in caught)
    results[rank] = (drops, [p.detach().clone() for p in model.parameters()], warned)
    dist.destroy_process_group()


def _run_two_processes(tmp_path, mode, stepped):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_uneven_ddp_worker, args=(2, tmp_path / "rendezvous", mode, stepped, results), nprocs=2)
        return results[0], results[1]


def test_ddp_processes_drop_the_same_blocks_at_every_step_after_uneven_inputs_and_an_extra_pass(tmp_path):
    (drops0, params0, warned0), (drops1, params1, warned1) = _run_two_processes(tmp_path, "batch", stepped=True)
    assert sorted(drops0) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)] and sorted(drops1) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for step in drops1:  # every step both processes took
        assert torch.equal(drops0[step], drops1[step]), step
    assert not all(d.all() for d in drops0.values())  # some blocks were dropped
    assert all(torch.equal(a, b) for a, b in zip(params0, params1))
    assert not warned0 and not warned1


def test_ddp_without_set_step_warns_in_batch_mode(tmp_path):
    # Without a step, a pass's key is its number: process 0, 2 passes ahead after epoch 0, drops others.
    (drops0, _, warned0), (drops1, _, warned1) = _run_two_processes(tmp_path, "batch", stepped=False)
    assert warned0 and warned1
    assert not all(torch.equal(drops0[step], drops1[step]) for step in [(1, 0), (1, 1)])


@pytest.mark.parametrize("mode", ["row", "row_subset"])
def test_ddp_processes_draw_their_own_samples_in_the_row_modes(tmp_path, mode):
    (drops0, _, _), (drops1, _, _) = _run_two_processes(tmp_path, mode, stepped=True)
    steps = sorted(drops1)
    a, b = (torch.stack([d[step] for step in steps]) for d in (drops0, drops1))  # (steps, gates, samples)
    # Independent draws agree on a sample with probability 1 - 2 p (1 - p) (row) or about that
    # (row_subset: k of B kept on each process, agreement 1 - 2 k (B - k) / (B (B - 1)) per sample).
    probs = torch.tensor(StochasticResNet.cifar(14, p_last=0.5).survival_probabilities)
    if mode == "row":
        agree = 1 - 2 * probs * (1 - probs)
    else:
        k = torch.tensor([max(1, math.floor(16 * p + 0.5)) for p in probs.tolist()], dtype=torch.float64)
        agree = 1 - 2 * k * (16 - k) / (16 * 15)
    trials = a.shape[0] * a.shape[2]
    expected = (agree * trials).sum().item()
    variance = (agree * (1 - agree) * trials).sum().item()
    observed = (a == b).sum().item()
    assert abs(observed - expected) <= 4.5 * math.sqrt(variance), (observed, expected)
    assert observed < a.numel()
    # Process 0's draws are the ones a single process with the same seed makes at those steps.
    single = StochasticResNet.cifar(14, mode=mode, p_last=0.5, seed=1234)
    for step in sorted(drops0):
        set_step(single, *step)
        single(batch(16)[0])
        assert torch.equal(single.active_blocks, drops0[step]), step


# ---------------------------------------------------------------------------------- LayerDrop (transformers' BART)


def _bart(layerdrop=0.5, convert=True):
    """A 4+4-layer transformers BART, no dropout (the processes' streams differ), LayerDrop 0.5; the same weights at every call."""
    import transformers

    config = transformers.BartConfig(
        d_model=16, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=50, max_position_embeddings=32, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=layerdrop, decoder_layerdrop=layerdrop,
    )
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(config)
    return add_stochastic_depth(model, seed=SEED) if convert else model


def _tokens(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {"input_ids": torch.randint(3, 50, (BATCH, 10), generator=g), "labels": torch.randint(3, 50, (BATCH, 7), generator=g)}


def _layer_drop_ddp_worker(rank, reentrant):
    torch.manual_seed(100 + rank)  # the processes' random streams differ
    model = _bart()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    try:
        ddp = data_parallel(model.train())
    except ValueError as error:
        return {"error": str(error)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    active = []
    for step in range(4):
        set_step(model, step)
        optimizer.zero_grad(set_to_none=True)
        ddp(**_tokens(step, rank)).loss.backward()
        optimizer.step()
        active.append([bool(g.last_active) for g in stochastic_depth_gates(model)])
    return {"active": active, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def test_layer_drop_under_ddp_with_checkpointing_drops_alike_and_trains_as_one_process():
    results = spawn(_layer_drop_ddp_worker, False)
    model = _bart().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(4):
        set_step(model, step)
        optimizer.zero_grad(set_to_none=True)
        # Both processes' samples; each process's loss is a mean over its own tokens (the same number).
        batches = [_tokens(step, rank) for rank in range(WORLD)]
        sum(model(**b).loss for b in batches).div(WORLD).backward()
        optimizer.step()
        active = [bool(g.last_active) for g in stochastic_depth_gates(model)]
        assert results[0]["active"][step] == results[1]["active"][step] == active
    assert not all(all(a) for a in results[0]["active"]) and any(any(a) for a in results[0]["active"])
    for n, p in model.named_parameters():
        assert torch.equal(results[0]["params"][n], results[1]["params"][n]), n
        torch.testing.assert_close(results[0]["params"][n], p.detach(), rtol=0, atol=2e-5, msg=n)


def test_reentrant_checkpointing_under_ddp_is_refused_saying_what_to_set():
    results = spawn(_layer_drop_ddp_worker, True)
    assert all("use_reentrant" in r["error"] and "False" in r["error"] for r in results)


def _layer_drop_fsdp_worker(rank):
    torch.manual_seed(100 + rank)
    model = fully_shard_stochastic_depth(_bart().train())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = []
    for step in range(3):
        set_step(model, step)
        optimizer.zero_grad(set_to_none=True)
        with collective_bytes() as sent:
            model(**_tokens(step, rank)).loss.backward()
        optimizer.step()
        steps.append({"active": [bool(g.last_active) for g in stochastic_depth_gates(model)], "all_gathered": sent.all_gathered})
    return {"steps": steps, "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}}


def test_layer_drop_under_fsdp2_gathers_only_the_kept_layers_and_trains_as_one_process():
    results = spawn(_layer_drop_fsdp_worker)
    model = _bart().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        set_step(model, step)
        optimizer.zero_grad(set_to_none=True)
        sum(model(**_tokens(step, rank)).loss for rank in range(WORLD)).div(WORLD).backward()
        optimizer.step()
        active = [bool(g.last_active) for g in stochastic_depth_gates(model)]
        for result in results:
            assert result["steps"][step]["active"] == active
            assert result["steps"][step]["all_gathered"] == _expected_all_gathered(model, active), step
    assert not all(all(s["active"]) for s in results[0]["steps"])
    for n, p in model.named_parameters():
        torch.testing.assert_close(results[0]["params"][n], p.detach(), rtol=0, atol=2e-5, msg=n)
