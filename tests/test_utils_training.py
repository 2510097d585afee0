"""BatchSampler, History and train_lockstep on tiny models and a few hundred MNIST samples."""

import signal

import pytest
import torch
from torch import nn

import utils
from resnet_with_stochastic_depth import StochasticDepth, StochasticResNet, stochastic_depth_state

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DETERMINISTIC = [m for m in utils.METRICS if m != "step_time"]  # step_time is a wall clock


# ---------------------------------------------------------------- sampler


def epoch_of(sampler):
    return torch.cat([sampler.next_batch()[1] for _ in range(sampler.batches_per_epoch)]).cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_serves_each_sample_once_per_epoch_and_reshuffles(device):
    labels = torch.arange(103)
    sampler = utils.BatchSampler(labels.float(), labels, 10, seed=1, device=device)
    first, second = epoch_of(sampler), epoch_of(sampler)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(103))
    assert not torch.equal(first, second) and not torch.equal(first, labels)
    images, batch_labels = sampler.next_batch()
    assert images.device.type == batch_labels.device.type == device
    assert torch.equal(images.long(), batch_labels)  # images and labels stay paired
    assert sampler.epoch == 2 and sampler.position == 10


def test_sampler_repeats_under_a_seed_and_differs_across_seeds():
    labels = torch.arange(50)

    def batches(seed):
        return torch.cat([b for _, b in utils.BatchSampler(labels, labels, 7, seed=seed, n_epochs=3)])

    assert len(batches(0)) == 150
    assert torch.equal(batches(0), batches(0))
    assert not torch.equal(batches(0), batches(1))


def test_sampler_in_order_and_finite():
    labels = torch.arange(10)
    sampler = utils.BatchSampler(labels, labels, 4, shuffle=False, n_epochs=2)
    assert [b.tolist() for _, b in sampler] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] * 2
    with pytest.raises(StopIteration):
        sampler.next_batch()


def test_sampler_state_dict_resumes_exactly():
    labels = torch.arange(30)
    sampler = utils.BatchSampler(labels, labels, 8, seed=3)
    for _ in range(5):  # into the second epoch
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch()[1] for _ in range(10)]
    resumed = utils.BatchSampler(labels, labels, 8, seed=99)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, (resumed.next_batch()[1] for _ in range(10))))
    with pytest.raises(ValueError, match="batches of 8 from 30 samples"):
        utils.BatchSampler(labels, labels, 9).load_state_dict(state)


# ---------------------------------------------------------------- history


def make_history():
    history = utils.History(["a", "b"])
    for i in range(3):
        for model in history.models:
            history.append(model, train_loss=1 / (i + 3), train_acc=0.1 * i, test_loss=2.0**-i,
                           test_acc=1 / 3, step_time=1e-3 * (i + 1))
    return history


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_history_saves_and_loads_exactly(tmp_path, suffix):
    history = make_history()
    history.save(tmp_path / f"history{suffix}")
    loaded = utils.History.load(tmp_path / f"history{suffix}")
    assert loaded == history and loaded.models == ["a", "b"] and len(loaded) == 3
    assert loaded["b"]["test_acc"] == [1 / 3] * 3


def test_history_rejects_unknown_formats_and_metrics(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        make_history().save(tmp_path / "history.txt")
    with pytest.raises(ValueError, match="need exactly the metrics"):
        make_history().append("a", train_loss=1.0)


# ---------------------------------------------------------------- lockstep training


class Linear(nn.Module):
    """Logistic regression, or with `hidden` an MLP with dropout; remembers the batches it saw."""

    def __init__(self, hidden=0):
        super().__init__()
        if hidden:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 10))
        else:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self.seen = []

    def forward(self, images):
        self.seen.append((self.training, images.sum().item()))
        return self.net(images)


class RandomMask(nn.Module):
    """Drops random samples every training step with a stochastic-depth gate (row mode), whose
    draws follow its pass counts, which the trainer must checkpoint."""

    def __init__(self, seed=0):
        super().__init__()
        self.gate = StochasticDepth(survival_prob=0.5, mode="row", seed=seed)
        self.linear = nn.Linear(784, 10)

    def forward(self, images):
        images = images.flatten(1)
        return self.linear(self.gate(lambda kept: kept, images, torch.zeros_like(images)))


def tiny_models():
    torch.manual_seed(0)
    return {"linear": Linear(), "mlp": Linear(hidden=32), "masked": RandomMask()}


@pytest.fixture(scope="module")
def small(mnist):
    """600 training and 300 test samples of MNIST."""
    train, test = mnist
    return utils.LabelledImages(train.images[:600], train.labels[:600]), utils.LabelledImages(test.images[:300], test.labels[:300])


def run(small, iterations=12, **kwargs):
    kwargs = {"batch_size": 50, "seed": 0, "progress": False, "device": "cpu", **kwargs}
    models = kwargs.pop("models", None) or tiny_models()
    return utils.train_lockstep(models, *small, iterations, **kwargs)


def assert_same_metrics(history, other):
    assert history.models == other.models
    for model in history.models:
        for metric in DETERMINISTIC:
            assert history[model][metric] == other[model][metric], (model, metric)


def test_lockstep_improves_on_identical_batches_and_repeats(small):
    models = tiny_models()
    history = run(small, iterations=30, models=models)
    assert len(history) == 30 and history.metrics == utils.METRICS
    for model in history.models:
        accuracy = history[model]["test_acc"]
        assert sum(accuracy[-5:]) / 5 > sum(accuracy[:2]) / 2 + 0.3, (model, accuracy)
        assert all(t > 0 for t in history[model]["step_time"])
        assert next(models[model].parameters()).requires_grad and models[model].training
    # Both recording models saw the same 30 training and 30 test batches, in the same order.
    assert models["linear"].seen == models["mlp"].seen
    assert [training for training, _ in models["linear"].seen] == [True, False] * 30
    assert_same_metrics(history, run(small, iterations=30))
    with pytest.raises(AssertionError):
        assert_same_metrics(history, run(small, iterations=30, seed=1))


def test_interrupt_then_resume_equals_an_uninterrupted_run(small, tmp_path):
    uninterrupted = run(small, iterations=12)

    models = tiny_models()
    calls = []

    def ctrl_c_during_iteration_5(module, inputs):
        calls.append(module.training)
        if module.training and calls.count(True) == 5:
            signal.raise_signal(signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    models["mlp"].register_forward_pre_hook(ctrl_c_during_iteration_5)
    checkpoint = tmp_path / "run.pt"
    with pytest.warns(UserWarning, match="stopped after iteration 5 of 12"):
        interrupted = run(small, models=models, checkpoint_path=checkpoint, checkpoint_every=4)
    assert len(interrupted) == 5 and signal.getsignal(signal.SIGINT) is handler

    resumed = run(small, models=tiny_models(), resume_from=checkpoint)
    assert len(resumed) == 12
    assert_same_metrics(resumed, uninterrupted)
    assert resumed["mlp"]["step_time"][:5] == interrupted["mlp"]["step_time"]


def test_periodic_checkpoint_resumes_and_needs_the_model_generators(small, tmp_path):
    uninterrupted = run(small, iterations=12)
    checkpoint = tmp_path / "run.pt"
    run(small, iterations=8, checkpoint_path=checkpoint, checkpoint_every=4)
    assert_same_metrics(run(small, resume_from=checkpoint), uninterrupted)

    # Without its generator's state, the masking model would drop different inputs.
    state = torch.load(checkpoint, weights_only=True)
    del state["rng"]["models"]["masked"]
    torch.save(state, checkpoint)
    resumed = run(small, resume_from=checkpoint)
    assert resumed["linear"]["test_acc"] == uninterrupted["linear"]["test_acc"]
    assert resumed["masked"]["test_acc"] != uninterrupted["masked"]["test_acc"]


def test_keyboard_interrupt_outside_the_handler_drops_the_partial_iteration(small):
    models = tiny_models()
    calls = []

    def raise_in_iteration_3(module, inputs):
        calls.append(module.training)
        if module.training and calls.count(True) == 3:
            raise KeyboardInterrupt

    models["mlp"].register_forward_pre_hook(raise_in_iteration_3)
    with pytest.warns(UserWarning, match="during iteration 3; returning the 2 iterations before it"):
        history = run(small, models=models)
    assert len(history) == 2 and all(len(history[m]["test_acc"]) == 2 for m in history.models)


class Exploding(Linear):
    def forward(self, images):
        output = super().forward(images)
        return output * float("nan") if sum(training for training, _ in self.seen) == 4 else output


def test_non_finite_loss_names_model_and_iteration_and_keeps_the_history(small):
    models = {"fine": Linear(), "exploding": Exploding()}
    message = r"model 'exploding': training loss is nan at iteration 4"
    with pytest.raises(utils.NonFiniteLossError, match=message) as error:
        run(small, models=models)
    assert len(error.value.history) == 3 and error.value.history.models == ["fine", "exploding"]


def test_non_finite_loss_leaves_no_model_a_step_ahead_of_the_history(small):
    models = {"fine": Linear(), "exploding": Exploding()}  # "fine" computes its loss first
    with pytest.raises(utils.NonFiniteLossError, match="no model took that step"):
        run(small, models=models)
    three_steps = {"fine": Linear(), "exploding": Exploding()}
    run(small, iterations=3, models=three_steps)
    for name in models:
        for key, value in three_steps[name].state_dict().items():
            assert torch.equal(models[name].state_dict()[key], value), (name, key)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(iterations=-1), "iterations must be an integer of at least 0, got -1"),
        (dict(iterations=2.5), "iterations must be an integer of at least 0, got 2.5"),
        (dict(test_batch_size=0), "test_batch_size must be an integer of at least 1, got 0"),
        (dict(batch_size=0), "batch_size must be an integer of at least 1, got 0"),
        (dict(checkpoint_every=0, checkpoint_path="c.pt"), "checkpoint_every must be an integer of at least 1, got 0"),
        (dict(checkpoint_every=2), "checkpoint_every needs a checkpoint_path"),
        (dict(drop_warmup_steps=-5), "drop_warmup_steps must be an integer of at least 0, got -5"),
        (dict(drop_warmup_steps=10), "drop_warmup_steps=10, but none of the models has stochastic depth"),
    ],
)
def test_bad_arguments_are_refused_before_any_step(small, kwargs, message):
    models = {"linear": Linear()}
    with pytest.raises(ValueError, match=message):
        run(small, models=models, **kwargs)
    assert models["linear"].seen == []


def test_checkpoint_in_a_missing_folder_is_refused_before_any_step(small, tmp_path):
    models = {"linear": Linear()}
    path = tmp_path / "no such folder" / "run.pt"
    with pytest.raises(ValueError, match=f"the folder {tmp_path / 'no such folder'} does not exist"):
        run(small, models=models, checkpoint_path=path)
    assert models["linear"].seen == []


def test_a_failing_checkpoint_write_names_the_file_and_keeps_the_history(small, tmp_path):
    path = tmp_path / "run.pt"
    (tmp_path / "run.pt.partial").mkdir()  # torch.save cannot write where a folder is
    with pytest.raises(utils.CheckpointError, match=f"could not write the checkpoint {path} after iteration 4") as error:
        run(small, checkpoint_path=path, checkpoint_every=4)
    assert len(error.value.history) == 4
    assert error.value.history["linear"]["test_acc"] == run(small, iterations=4)["linear"]["test_acc"]


def test_resuming_with_fewer_iterations_than_the_checkpoint_is_refused(small, tmp_path):
    run(small, iterations=6, checkpoint_path=tmp_path / "run.pt")
    with pytest.raises(ValueError, match="holds 6 iterations, more than iterations=4.*at least 6"):
        run(small, iterations=4, resume_from=tmp_path / "run.pt")
    assert len(run(small, iterations=6, resume_from=tmp_path / "run.pt")) == 6  # nothing left to do


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_an_unreadable_checkpoint_is_named(small, tmp_path, damage):
    path = tmp_path / "run.pt"
    run(small, iterations=2, checkpoint_path=path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint" * 100)
    else:
        path.unlink()
    with pytest.raises(utils.CheckpointError, match=str(path)):
        run(small, resume_from=path)


# ---------------------------------------------------------------- drop warm-up


def stochastic_models(seed=0):
    """A CIFAR ResNet-8 for MNIST with 3 blocks that each survive with p = 0.5 at the target rate."""
    torch.manual_seed(seed)
    return {"stochastic": StochasticResNet.cifar(8, in_channels=1, survival_rule="uniform", p_last=0.5, seed=seed)}


def record_drops(model):
    drops = []
    model.register_forward_hook(lambda m, inputs, out: drops.append(m.active_blocks) if m.training else None)
    return drops


def test_drop_warmup_ramps_the_drop_rate_from_zero(small):
    models = stochastic_models()
    drops = record_drops(models["stochastic"])
    warmup, iterations = 120, 160
    run(small, iterations=iterations, batch_size=8, models=models, drop_warmup_steps=warmup)
    kept = torch.stack(drops).sum(1)  # blocks kept at each iteration, of 3
    assert kept[0] == 3  # iteration 1: drop_scale 0
    # Windows of 40 iterations: iteration i keeps each block with p_i = 1 - 0.5 * min(1, (i - 1) / 120);
    # the kept count of a window is a sum of Bernoullis, within 4.5 standard deviations of its mean.
    for first in range(0, iterations, 40):
        p = [1 - 0.5 * min(1, i / warmup) for i in range(first, first + 40)]
        mean = 3 * sum(p)
        sigma = (3 * sum(q * (1 - q) for q in p)) ** 0.5
        assert abs(kept[first : first + 40].sum().item() - mean) <= 4.5 * sigma, (first, kept[first : first + 40].sum(), mean)
    assert stochastic_depth_state(models["stochastic"]).drop_scale == 1.0


def test_drop_warmup_is_carried_by_checkpoints(small, tmp_path):
    kwargs = dict(batch_size=8, drop_warmup_steps=20)
    uninterrupted_models = stochastic_models()
    uninterrupted = run(small, iterations=16, models=uninterrupted_models, **kwargs)
    path = tmp_path / "run.pt"
    run(small, iterations=8, models=stochastic_models(), checkpoint_path=path, **kwargs)
    resumed_models = stochastic_models()
    resumed = run(small, iterations=16, models=resumed_models, resume_from=path, **kwargs)
    assert_same_metrics(resumed, uninterrupted)
    assert stochastic_depth_state(resumed_models["stochastic"]).drop_scale == 15 / 20
    with pytest.raises(ValueError, match="drop_warmup_steps=20, not 5: resume with drop_warmup_steps=20"):
        run(small, iterations=16, models=stochastic_models(), resume_from=path, batch_size=8, drop_warmup_steps=5)


@pytest.mark.parametrize("device", DEVICES)
def test_lockstep_on_each_available_device(small, device, tmp_path):
    models = tiny_models()
    history = run(small, iterations=6, models=models, device=device, checkpoint_path=tmp_path / "c.pt")
    assert len(history) == 6 and next(models["mlp"].parameters()).device.type == device
    assert run(small, iterations=9, device=device, resume_from=tmp_path / "c.pt").models == history.models


def test_pick_device_prefers_cuda_then_mps_then_the_cpu(monkeypatch):
    assert utils.pick_device("cpu") == torch.device("cpu")
    for cuda, mps, expected in [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
        assert utils.pick_device().type == expected


def test_predict_matches_one_eval_pass_in_batches_and_restores_each_mode():
    from training import evaluate, predict

    torch.manual_seed(0)
    model = StochasticResNet.cifar(14, in_channels=1, seed=0).train()
    model.bn1.eval()  # frozen by the user: stays in eval mode afterwards
    before = [m.training for m in model.modules()]
    images, labels = torch.rand(10, 1, 28, 28), torch.arange(10)
    with torch.no_grad():
        reference = model.eval()(images * 2)
    for m, training in zip(model.modules(), before):
        m.training = training
    logits = predict(model, images, batch_size=3, preprocess=lambda x: x * 2)
    assert logits.shape == (10, 10) and torch.allclose(logits, reference, atol=1e-5)
    assert [m.training for m in model.modules()] == before
    loss, accuracy = evaluate(model, utils.LabelledImages(images, labels), batch_size=4, preprocess=lambda x: x * 2)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(reference, labels).item(), rel=1e-5)
    assert accuracy == (reference.argmax(1) == labels).float().mean().item()
    assert [m.training for m in model.modules()] == before


def test_a_failed_atomic_write_leaves_the_previous_file_whole(tmp_path):
    from atomic_files import write_atomically, write_json_atomically

    path = tmp_path / "metrics.json"
    write_json_atomically(path, {"epoch": 1})

    def fails_halfway(partial):
        partial.write_text('{"epo')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fails_halfway)
    assert path.read_text() == '{"epoch": 1}' and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    write_json_atomically(path, {"epoch": 2}, indent=1)
    assert path.read_text() == '{\n "epoch": 2\n}'
