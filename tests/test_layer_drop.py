"""LayerDrop in Hugging Face transformers' stacks (stochastic_depth.layer_drop): the converted layers
against the unconverted model, the drop frequencies, skipped work, the config, hidden states,
gradient checkpointing and the refusals. (DDP and FSDP2: test_distributed.py.)

Each family is built from a tiny config (4 layers per stack, width 16) with LayerDrop 0.3."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from stochastic_depth import add_stochastic_depth, set_step, stochastic_depth_gates  # noqa: E402
from stochastic_depth.layer_drop import LayerDropLayer  # noqa: E402

T = transformers
RATE = 0.3
SPEECH = dict(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
              conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
              layerdrop=RATE, vocab_size=12)  # fmt: skip
SEQ2SEQ = dict(d_model=16, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2, decoder_attention_heads=2,
               encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=50, encoder_layerdrop=RATE, decoder_layerdrop=RATE)  # fmt: skip


def _speech(n=4, seed=1):
    return dict(input_values=torch.randn(n, 800, generator=torch.Generator().manual_seed(seed)))


def _tokens(n=4, seed=1, labels=True):
    generator = torch.Generator().manual_seed(seed)
    inputs = dict(input_ids=torch.randint(3, 50, (n, 10), generator=generator))
    return inputs | (dict(labels=torch.randint(3, 50, (n, 7), generator=generator)) if labels else {})


# Each family: (model from a config, inputs of a batch of n, the config keys of its rates).
FAMILIES = {
    "Wav2Vec2": (lambda: T.Wav2Vec2ForCTC(T.Wav2Vec2Config(**SPEECH)), _speech, ("layerdrop",)),
    "HuBERT": (lambda: T.HubertForCTC(T.HubertConfig(**SPEECH)), _speech, ("layerdrop",)),
    "WavLM": (lambda: T.WavLMForCTC(T.WavLMConfig(**SPEECH, num_buckets=8, max_bucket_distance=20)), _speech, ("layerdrop",)),
    "BART": (lambda: T.BartForConditionalGeneration(T.BartConfig(**SEQ2SEQ, max_position_embeddings=32)), _tokens,
             ("encoder_layerdrop", "decoder_layerdrop")),
    "Whisper": (lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
        **SEQ2SEQ, num_mel_bins=8, max_source_positions=16, max_target_positions=16, pad_token_id=0,
        decoder_start_token_id=1, bos_token_id=1, eos_token_id=2)),
        lambda n=4, seed=1: dict(input_features=torch.randn(n, 8, 32, generator=torch.Generator().manual_seed(seed)),
                                 labels=torch.randint(3, 50, (n, 7), generator=torch.Generator().manual_seed(seed))),
        ("encoder_layerdrop", "decoder_layerdrop")),
    "OPT": (lambda: T.OPTForCausalLM(T.OPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, ffn_dim=32,
                                                 vocab_size=50, max_position_embeddings=32, word_embed_proj_dim=16,
                                                 layerdrop=RATE, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
            lambda n=4, seed=1: _tokens(n, seed, labels=False) | {"labels": _tokens(n, seed, labels=False)["input_ids"]},
            ("layerdrop",)),
}  # fmt: skip


def build(family, seed=0):
    torch.manual_seed(seed)
    return FAMILIES[family][0]()


def inputs(family, n=4, seed=1):
    return FAMILIES[family][1](n, seed)


def layers(model):
    return [m for m in model.modules() if isinstance(m, LayerDropLayer)]


def loss(out):
    """The model's loss where it has labels (BART, Whisper, OPT), else one of its logits (the CTC heads)."""
    return out.loss if out.loss is not None else out.logits.square().mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_is_the_unconverted_model_bit_for_bit_and_the_config_keeps_its_layerdrop(family, tmp_path):
    unconverted = build(family).eval()
    model = add_stochastic_depth(copy.deepcopy(unconverted), seed=0).eval()
    x = inputs(family)
    with torch.no_grad():
        expected, out = unconverted(**x, output_hidden_states=True), model(**x, output_hidden_states=True)
    assert torch.equal(out.logits, expected.logits)
    for key in [k for k in expected.keys() if k.endswith("hidden_states")]:
        assert all(torch.equal(a, b) for a, b in zip(out[key], expected[key]))
    gates = stochastic_depth_gates(model)
    assert len(gates) == len(layers(model)) >= 4 and all(isinstance(g, nn.Module) for g in gates)
    first_kept = family == "WavLM"  # as transformers has it: its first layer computes the position bias
    assert [g.survival_prob for g in gates] == pytest.approx([1.0] * first_kept + [1 - RATE] * (len(gates) - first_kept))
    assert all(g.mode == "batch" for g in gates)  # LayerDrop draws once per layer and pass
    assert all(type(layer).__name__ == type(layer).LAYER_CLASS.__name__ for layer in layers(model))
    model.save_pretrained(tmp_path)
    saved = type(model.config).from_pretrained(tmp_path)
    for key in FAMILIES[family][2]:
        assert getattr(model.config, key) == getattr(saved, key) == RATE  # what the user set, not 0
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dropped_layer_does_not_run_gets_no_gradient_and_passes_its_input_on(family):
    model = add_stochastic_depth(build(family), seed=1).train()
    calls = set()
    for layer in layers(model):
        for child in layer.children():
            if not isinstance(child, type(layer.layerdrop)):
                child.register_forward_hook(lambda m, args, out: calls.add(m))
    dropped = kept = 0
    for step in range(3):
        model.zero_grad(set_to_none=True)
        calls.clear()
        set_step(model, step)
        out = model(**inputs(family), output_hidden_states=True)
        loss(out).backward()
        for layer in layers(model):
            active = bool(layer.layerdrop.last_active)
            dropped, kept = dropped + (not active), kept + active
            children = [c for c in layer.children() if not isinstance(c, type(layer.layerdrop))]
            assert all((c in calls) == active for c in children), layer
            assert all((p.grad is not None) == active for p in layer.parameters()), layer
        # One hidden state per layer in training too (a dropped layer's is its input).
        for key in [k for k in out.keys() if k.endswith("hidden_states")]:
            assert len(out[key]) == 5
    assert dropped and kept


@pytest.mark.parametrize("family", FAMILIES)
def test_each_layers_drop_frequency_is_the_configs_layerdrop(family):
    # 60 steps of batch mode: each layer's drops ~ Binomial(60, 0.3); within 4.5 standard deviations.
    model = add_stochastic_depth(build(family), seed=2).train()
    gates = [g for g in stochastic_depth_gates(model) if g.survival_prob < 1]  # (WavLM's first layer is kept)
    counts = torch.zeros(len(gates))
    steps = 60
    x = inputs(family, n=2)
    with torch.no_grad():
        for step in range(steps):
            set_step(model, step)
            model(**x)
            counts += torch.tensor([not bool(g.last_active) for g in gates], dtype=torch.float)
    bound = 4.5 * math.sqrt(steps * RATE * (1 - RATE))
    assert all(abs(c - steps * RATE) <= bound for c in counts.tolist()), counts.tolist()


def test_the_stacks_own_draw_is_off_and_draws_nothing_from_torchs_generator():
    # transformers' own LayerDrop draws torch.rand([]) per layer; converted, only the gates decide.
    for family in ("Wav2Vec2", "BART"):
        model = add_stochastic_depth(build(family), seed=0).train()
        for gate in stochastic_depth_gates(model):
            gate.survival_prob = 1.0  # the gates keep every layer: any drop would be transformers'
        x = inputs(family)
        torch.manual_seed(0)
        with torch.no_grad():
            out = model(**x, output_hidden_states=True)
        assert all(bool(g.last_active) for g in stochastic_depth_gates(model))
        assert all(len(out[k]) == 5 for k in out.keys() if k.endswith("hidden_states"))


@pytest.mark.parametrize("family", ["Wav2Vec2", "BART"])
def test_gradient_checkpointing_checkpoints_every_layer_with_the_same_drops(family):
    x = inputs(family)

    def run(model, checkpointing):
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        counts = []
        for module in model.modules():
            function = getattr(module, "_gradient_checkpointing_func", None)
            if function is not None and isinstance(module, LayerDropLayer):
                module._gradient_checkpointing_func = lambda *a, _f=function, **k: counts.append(1) or _f(*a, **k)
        set_step(model.train(), 5)
        torch.manual_seed(0)  # the same dropout masks in both runs (a recomputation restores them),
        np.random.seed(0)  # and the same SpecAugment masks (wav2vec2 draws them with numpy)
        loss(model(**x)).backward()
        return len(counts)

    model = add_stochastic_depth(build(family), seed=3)
    reference = copy.deepcopy(model)
    assert run(model, True) == len(layers(model))  # every layer, the dropped ones too, goes through its checkpoint
    run(reference, False)
    assert [bool(g.last_active) for g in stochastic_depth_gates(model)] == [
        bool(g.last_active) for g in stochastic_depth_gates(reference)]
    assert not all(bool(g.last_active) for g in stochastic_depth_gates(model))
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), name


def test_row_modes_skip_a_layer_per_sample_and_wavlms_position_bias_refuses_them():
    model = add_stochastic_depth(build("BART"), mode="row_subset", seed=0).train()
    loss(model(**inputs("BART"))).backward()
    assert all(g.last_active.shape == (4,) for g in stochastic_depth_gates(model))
    wavlm = add_stochastic_depth(build("WavLM"), mode="row", seed=0).train()
    with pytest.raises(ValueError, match=r"position_bias.*mode='batch'"):
        wavlm(**inputs("WavLM"))


def test_converting_twice_keeps_the_rates_and_the_users_config():
    model = add_stochastic_depth(build("Wav2Vec2"), seed=0)
    add_stochastic_depth(model, seed=0)
    assert [g.survival_prob for g in stochastic_depth_gates(model)] == pytest.approx([1 - RATE] * 4)
    assert model.config.layerdrop == RATE
    model.config.output_hidden_states = True  # the encoder's view of the config follows the model's
    assert model.wav2vec2.encoder.config.output_hidden_states is True


def test_an_adapter_stack_is_refused_naming_it_and_why_and_nothing_changes():
    model = T.Wav2Vec2ForCTC(T.Wav2Vec2Config(**SPEECH, add_adapter=True, num_adapter_layers=2, output_hidden_size=16))
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(TypeError, match=r"Wav2Vec2Adapter.*stride-2 convolutions.*wav2vec2.adapter.layerdrop = 0.0"):
        add_stochastic_depth(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert model.wav2vec2.encoder.config is model.config
    model.wav2vec2.adapter.layerdrop = 0.0  # what the error says: the rest converts
    add_stochastic_depth(model, seed=0)
    assert len(stochastic_depth_gates(model)) == 4


def test_keep_blocks_removes_whole_layers_as_layerdrop_would_at_test_time():
    from stochastic_depth.evaluation_network import depth_units, keep_blocks

    unconverted = build("BART").eval()
    model = add_stochastic_depth(copy.deepcopy(unconverted), seed=0).eval()
    x = inputs("BART")
    units = depth_units(model)
    assert len(units) == 8  # 4 encoder and 4 decoder layers
    with torch.no_grad():
        evaluation = model(**x).logits
        with keep_blocks(model, range(8)):
            assert torch.equal(model(**x).logits, evaluation)
        removed = [3, 7]  # the last encoder and the last decoder layer
        ran = []
        hooks = [units[i][0][0].self_attn.register_forward_hook(lambda m, a, o: ran.append(m)) for i in removed]
        with keep_blocks(model, [i for i in range(8) if i not in removed]):
            out = model(**x).logits
        for h in hooks:
            h.remove()
        assert ran == []  # the removed layers do not run
        # Reference: the unconverted model with those layers' outputs replaced by their inputs.
        layers_ = [*unconverted.model.encoder.layers, *unconverted.model.decoder.layers]
        handles = [layers_[i].register_forward_hook(lambda m, args, out: args[0]) for i in removed]
        torch.testing.assert_close(out, unconverted(**x).logits, atol=1e-6, rtol=1e-6)
        for h in handles:
            h.remove()
        assert torch.equal(model(**x).logits, evaluation)  # restored


def test_a_copy_or_a_pickle_of_the_model_keeps_its_encoder_following_its_own_config():
    import pickle

    # (Data2Vec-Audio for pickling: wav2vec2's weight-normed convolution pickles through its state_dict only)
    model = add_stochastic_depth(T.Data2VecAudioForCTC(T.Data2VecAudioConfig(**SPEECH)), seed=0)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        encoder_config = copied.data2vec_audio.encoder.config
        assert encoder_config.layerdrop == 0.0 and copied.config.layerdrop == RATE
        copied.set_attn_implementation("eager")  # changes the model's config: the encoder's must follow
        assert encoder_config._attn_implementation == "eager"
        assert model.data2vec_audio.encoder.config._attn_implementation != "eager"  # the original is not the copy's


def test_converting_again_keeps_each_layers_rate():
    model = add_stochastic_depth(build("BART"), "linear", 0.5, seed=0)
    rates = [g.survival_prob for g in stochastic_depth_gates(model)]
    assert len(set(rates)) == 8
    add_stochastic_depth(model, seed=0)
    assert [g.survival_prob for g in stochastic_depth_gates(model)] == rates
