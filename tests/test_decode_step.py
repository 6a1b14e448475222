"""The fast path's decode step (generation_mlmamba.py), on CPU.

References: transformers' own `Mamba2Model` forward on one token against the same prefilled state (the plain path),
and the step run without compilation. The GPU-only parts (CUDA graph capture, the mamba_ssm / causal_conv1d kernels)
are tested in test_gpu_fast_path.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tests.tiny import image_prompt_ids, tiny_model, tiny_text_config
from transformers.generation import utils as generation_utils
from transformers.models.mamba2 import modeling_mamba2

from modeling_mlmamba.generation_mlmamba import (
    DecodeGraphRunner,
    PendingSteps,
    _block_shape,
    defer_state_writes,
    deferred_steps,
    _torch_conv_update,
    _torch_state_update,
    allow_deferred_stop_checks,
    make_block_step,
    register_kernel_ops,
)
from modeling_mlmamba.modeling_mlmamba import MLMambaCausalLMOutput

# transformers' Mamba-2 functions dispatch to mamba_ssm's / causal_conv1d's CUDA kernels whenever those are installed,
# CPU tensors included: these CPU tests of the torch path run where they are not (the GPU path has its own tests)
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mamba_ssm") is not None or importlib.util.find_spec("causal_conv1d") is not None,
    reason="CPU tests of the torch path; mamba_ssm / causal_conv1d would take CPU tensors to their CUDA kernels",
)


def _prefilled(model, runner_cache_batch=2):
    """Two caches holding the same prefill of a 2-row image prompt: one for the step, one for the reference."""
    ids = torch.cat([image_prompt_ids(model.config, [5, 6, 7, 8]), image_prompt_ids(model.config, [9, 10, 11, 12])])
    pv = torch.randn(2, 6, 32, 32, generator=torch.Generator().manual_seed(3))
    caches = []
    for _ in range(2):
        cache = DecodeGraphRunner(model, MLMambaCausalLMOutput, compile_mode=None).cache_for(runner_cache_batch)
        logits = model(input_ids=ids, pixel_values=pv, cache_params=cache, use_cache=True).logits
        caches.append(cache)
    return logits[:, -1:].argmax(-1), caches


@pytest.mark.parametrize(
    "text_overrides",
    [dict(), dict(residual_in_fp32=False), dict(n_groups=2, num_heads=4)],
    ids=["released", "bf16-residual-shape", "two-groups"],
)
@torch.no_grad()
def test_decode_step_matches_transformers_mamba2_token_by_token(text_overrides):
    model = tiny_model(seed=21, text_config=tiny_text_config(**text_overrides))
    next_ids, (cache, reference_cache) = _prefilled(model)
    runner = DecodeGraphRunner(model, MLMambaCausalLMOutput, compile_mode=None)
    for step in range(8):
        reference = model(input_ids=next_ids, cache_params=reference_cache, use_cache=True).logits.float()
        fast = runner._step(next_ids, cache)
        assert fast.shape == reference.shape == (2, 1, model.config.text_config.vocab_size)
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5, msg=f"logits differ at step {step}")
        for layer, (mine, theirs) in enumerate(zip(cache.layers, reference_cache.layers)):
            torch.testing.assert_close(mine.conv_states[0], theirs.conv_states[0], msg=f"conv state, layer {layer}")
            torch.testing.assert_close(mine.recurrent_states[0], theirs.recurrent_states[0], atol=1e-6, rtol=1e-5,
                                       msg=f"SSM state, layer {layer}")
        next_ids = reference.argmax(-1)


@torch.no_grad()
def test_decode_block_traces_as_one_graph_around_the_kernel_ops():
    """The per-layer function with the kernels behind custom ops (as on a GPU with mamba_ssm / causal_conv1d):
    torch.compile takes it whole (fullgraph), and the compiled layer updates the states and returns what the plain
    function does. aot_eager traces with fake tensors (the ops' fake implementations) without generating code."""
    model = tiny_model(seed=22)
    lm = model.model.language_model
    # transformers' torch functions have the signatures of causal_conv1d_update and mamba_ssm's selective_state_update
    ops = register_kernel_ops(modeling_mamba2.causal_conv1d_update, modeling_mamba2.mamba2_selective_state_update,
                              namespace="mlmamba_test")
    kernels = (ops.conv_state_update, ops.ssm_state_update, ("op", "op"))
    plain = make_block_step(lm, kernels=(_torch_conv_update, _torch_state_update, ("torch", "torch")))
    compiled = torch.compile(make_block_step(lm, kernels=kernels), backend="aot_eager", fullgraph=True, dynamic=False)
    next_ids, (cache, _) = _prefilled(model)
    layer = lm.layers[1]
    mixer = layer.mixer
    weights = (layer.norm.weight, mixer.in_proj.weight, mixer.in_proj.bias, mixer.conv1d.weight, mixer.conv1d.bias,
               mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight, mixer.out_proj.weight, mixer.out_proj.bias)
    residual = torch.randn(2, 1, lm.config.hidden_size)
    out = torch.randn(2, 1, lm.config.hidden_size)
    states = [(cache.layers[1].conv_states[0].clone(), cache.layers[1].recurrent_states[0].clone()) for _ in range(2)]
    for _ in range(2):  # twice: the second call reuses the compiled graph; each call advances its copy of the states
        expected = plain(residual, out, *states[0], *weights)
        got = compiled(residual, out, *states[1], *weights)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(states[1][0], states[0][0])
    torch.testing.assert_close(states[1][1], states[0][1])
    assert not torch.equal(states[1][1], cache.layers[1].recurrent_states[0]), "the op did not update the state"


def test_deferred_stop_check_is_widened_only_for_the_fast_path_caches():
    if not hasattr(generation_utils, "DeferredStopCheck"):
        pytest.skip("this transformers has no DeferredStopCheck")
    assert allow_deferred_stop_checks() and allow_deferred_stop_checks()  # idempotent
    check = generation_utils.DeferredStopCheck.is_supported
    assert getattr(check, "_mlmamba_widened", False)

    class Flagged:
        _mlmamba_defer_stop_check = True
        is_croppable = False

    class Plain:
        is_croppable = False

    cuda = torch.device("cuda")
    assert check(cuda, Flagged(), False, is_assistant=False)
    # everything else gets transformers' own answer (MPS only, and never when the cache is handed back)
    assert not check(cuda, Flagged(), True, is_assistant=False)
    assert not check(cuda, Flagged(), False, is_assistant=True)
    assert not check(cuda, Plain(), False, is_assistant=False)
    assert check(torch.device("mps"), None, False, is_assistant=False)


def test_release_frees_other_batch_sizes_and_keeps_the_one_asked_for():
    model = tiny_model(seed=24)
    runner = DecodeGraphRunner(model, MLMambaCausalLMOutput, compile_mode=None)
    kept, dropped = runner.cache_for(2), runner.cache_for(3)
    runner.release(keep=(2,))
    assert runner.caches == {2: kept}
    assert runner.cache_for(3) is not dropped  # allocated again on next use


@torch.no_grad()
def test_bfloat16_ssm_state_decodes_like_a_float32_state_rounded_after_every_token():
    """config.ssm_state_dtype="bfloat16": the fast path's cache keeps the SSM state in bf16. Reference: transformers'
    own step on a float32 state that is rounded to bf16 after the prefill and after every token (what storing it in
    bf16 means; each token's output is computed before the rounding, as mamba_ssm's kernel does)."""
    model = tiny_model(seed=25)
    ids = torch.cat([image_prompt_ids(model.config, [5, 6, 7, 8]), image_prompt_ids(model.config, [9, 10, 11, 12])])
    pv = torch.randn(2, 6, 32, 32, generator=torch.Generator().manual_seed(3))
    reference_cache = DecodeGraphRunner(model, MLMambaCausalLMOutput, compile_mode=None).cache_for(2)
    model.config.ssm_state_dtype = "bfloat16"
    runner = DecodeGraphRunner(model, MLMambaCausalLMOutput, compile_mode=None)
    cache = runner.cache_for(2)
    assert {layer.recurrent_states[0].dtype for layer in cache.layers} == {torch.bfloat16}
    assert reference_cache.layers[0].recurrent_states[0].dtype == torch.float32

    def round_reference():
        for layer in reference_cache.layers:
            layer.recurrent_states[0].copy_(layer.recurrent_states[0].bfloat16().float())

    model(input_ids=ids, pixel_values=pv, cache_params=cache, use_cache=True)
    next_ids = model(input_ids=ids, pixel_values=pv, cache_params=reference_cache, use_cache=True).logits[:, -1:]
    next_ids = next_ids.argmax(-1)
    round_reference()
    for step in range(6):
        reference = model(input_ids=next_ids, cache_params=reference_cache, use_cache=True).logits.float()
        round_reference()
        fast = runner._step(next_ids, cache)
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5, msg=f"logits differ at step {step}")
        for layer, (mine, theirs) in enumerate(zip(cache.layers, reference_cache.layers)):
            torch.testing.assert_close(mine.recurrent_states[0].float(), theirs.recurrent_states[0], atol=0, rtol=0,
                                       msg=f"SSM state, layer {layer}, step {step}")
        next_ids = reference.argmax(-1)

    # switching back re-allocates the batch's cache in float32
    model.config.ssm_state_dtype = "float32"
    assert runner.cache_for(2).layers[0].recurrent_states[0].dtype == torch.float32


@torch.no_grad()
def test_ssm_state_dtype_follows_the_language_model_by_default():
    """config.ssm_state_dtype defaults to "auto": the fast path's SSM state in the LM's dtype, as mamba_ssm's Mamba-2
    allocates it (in_proj's dtype) and so the original code decodes a bf16 model; "float32" keeps it in float32
    whatever the model's dtype."""
    model = tiny_model(seed=26)
    assert model.config.ssm_state_dtype == "auto"
    runner = DecodeGraphRunner(model, MLMambaCausalLMOutput, compile_mode=None)
    assert runner.cache_for(1).layers[0].recurrent_states[0].dtype == torch.float32
    model.to(torch.bfloat16)
    runner = DecodeGraphRunner(model, MLMambaCausalLMOutput, compile_mode=None)
    assert {layer.recurrent_states[0].dtype for layer in runner.cache_for(1).layers} == {torch.bfloat16}
    assert {layer.conv_states[0].dtype for layer in runner.cache_for(1).layers} == {torch.bfloat16}
    model.config.ssm_state_dtype = "float32"
    assert {layer.recurrent_states[0].dtype for layer in runner.cache_for(1).layers} == {torch.float32}


def test_ssm_state_dtype_is_checked():
    from modeling_mlmamba import MLMambaConfig

    with pytest.raises(ValueError, match="ssm_state_dtype must be one of .*'float64'"):
        MLMambaConfig(ssm_state_dtype="float64")


def test_shape_graphs_capture_a_shape_at_its_second_sight_and_keep_the_most_recent():
    """ShapeGraphs' bookkeeping (the capture itself needs CUDA and is tested in test_gpu_fast_path.py): a shape's
    first call returns None (the caller runs eagerly), its second captures and replays, later ones replay; at most
    `limit` shapes are kept, the least recently used dropped; `drop` forgets a shape and its sightings; the replay
    hands out copies of the outputs, with the given inputs copied in."""
    from modeling_mlmamba.generation_mlmamba import ShapeGraphs

    class Replay:  # stands for a captured graph: re-runs the function on the static inputs into the static outputs
        def __init__(self, fn, static_inputs, static_outputs):
            self.fn, self.static_inputs, self.static_outputs = fn, static_inputs, static_outputs

        def replay(self):
            for out, value in zip(self.static_outputs, self.fn(*self.static_inputs)):
                out.copy_(value)

    captured = []

    class Fake(ShapeGraphs):
        def _capture(self, inputs):
            static_inputs = tuple(t.clone() for t in inputs)
            static_outputs = tuple(self.fn(*static_inputs))
            captured.append(tuple(inputs[0].shape))
            return Replay(self.fn, static_inputs, static_outputs), static_inputs, static_outputs

    graphs = Fake(lambda x: (x * 2,), limit=2)
    a, b, c = torch.ones(2, 3), torch.ones(4, 3), torch.ones(5, 3)
    assert graphs(a) is None and captured == []
    out = graphs(a + 1)
    assert captured == [(2, 3)] and torch.equal(out[0], (a + 1) * 2)
    again = graphs(a + 2)
    assert captured == [(2, 3)] and torch.equal(again[0], (a + 2) * 2) and torch.equal(out[0], (a + 1) * 2)
    for x in (b, b, c, c):  # b and c captured: a (least recently used) is dropped
        graphs(x)
    assert list(graphs.graphs) == [ShapeGraphs.key((b,)), ShapeGraphs.key((c,))]
    graphs.drop(lambda key: key[0][0][0] == 4)
    assert list(graphs.graphs) == [ShapeGraphs.key((c,))] and graphs(b) is None  # b's sightings are forgotten too
    for x in (a, a):  # a was dropped by the limit: seen again, it is captured again
        graphs(x)
    assert captured[-1] == (2, 3) and ShapeGraphs.key((a,)) in graphs.graphs

    class Failing(ShapeGraphs):  # a capture that fails (e.g. a host synchronisation inside fn) leaves the shape eager
        def _capture(self, inputs):
            raise RuntimeError("operation not permitted when stream is capturing")

    failing = Failing(lambda x: (x,))
    assert [failing(a), failing(a), failing(a)] == [None, None, None] and failing.failed == {ShapeGraphs.key((a,))}


def test_fast_path_is_skipped_when_a_layer_is_not_the_plain_module():
    """The decode step reads each layer's weight tensors directly; with an unmerged PEFT adapter on in_proj (whose
    `.weight` is the base weight) it would decode the base model, so `generate()` must take transformers' path. After
    merging, the plain modules are back and so is the fast path."""
    from peft import LoraConfig, get_peft_model

    from modeling_mlmamba.generation_mlmamba import reads_plain_weights

    model = tiny_model(seed=23)
    assert reads_plain_weights(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["in_proj"]))
    assert not reads_plain_weights(peft_model.base_model.model)
    merged = peft_model.merge_and_unload()
    assert reads_plain_weights(merged)


def _one_pass_rmsnorm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, calls=None):
    """What mamba_ssm's `rmsnorm_fn` computes (its Triton kernel, written out): x * silu(z) in float32, each group
    scaled by its reciprocal RMS, times the weight, rounded once to x's dtype."""
    assert bias is None and not norm_before_gate
    if calls is not None:
        calls.append(x.shape)
    h = x.float() if z is None else x.float() * torch.nn.functional.silu(z.float())
    groups = h.unflatten(-1, (-1, group_size or h.shape[-1]))
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    return (groups.flatten(-2) * weight.float()).to(x.dtype)


@torch.no_grad()
def test_fused_norms_route_the_lm_norms_through_the_kernel_and_restore_them():
    """`fused_norms` (the fast path's prefill and final norm) sends every block norm, gated norm and the final norm
    through the one-pass kernel: a prefill then gives transformers' logits and SSM states (float32, summation order
    aside), and afterwards the modules are transformers' own again."""
    from functools import partial

    from modeling_mlmamba.generation_mlmamba import fused_norms

    model = tiny_model(seed=25, text_config=tiny_text_config(n_groups=2, num_heads=4))
    lm = model.model.language_model
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(4))
    reference = lm(input_ids=ids).last_hidden_state
    calls = []
    with fused_norms(lm, partial(_one_pass_rmsnorm, calls=calls), device_types=("cpu",)) as switched:
        assert switched
        fused = lm(input_ids=ids).last_hidden_state
        with torch.enable_grad():  # gradients wanted: the modules' own forward (the kernel has no backward here)
            lm.norm_f(torch.randn(2, lm.config.hidden_size, requires_grad=True))
    # per layer its block norm and its gated norm, then the final norm; nothing during the gradient call
    layers = lm.config.num_hidden_layers
    assert len(calls) == 2 * layers + 1
    assert calls.count((2, 9, lm.config.hidden_size)) == layers + 1
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    for module in [lm.norm_f] + [m for layer in lm.layers for m in (layer.norm, layer.mixer.norm)]:
        assert "forward" not in module.__dict__
    # other devices than the kernel's, and an output dtype the kernel would not give, keep the modules' forward
    calls.clear()
    with fused_norms(lm, partial(_one_pass_rmsnorm, calls=calls)):  # CUDA only, by default
        lm(input_ids=ids)
        norm = lm.layers[0].norm
        norm.weight.data = norm.weight.data.float()
        with fused_norms(lm, partial(_one_pass_rmsnorm, calls=calls), device_types=("cpu",)):
            out = norm(torch.randn(2, lm.config.hidden_size, dtype=torch.bfloat16))  # promotes to float32
    assert calls == [] and out.dtype == torch.float32


def test_fused_norms_leave_hooked_and_replaced_modules_alone():
    """A norm with a forward of its own (accelerate's hooks set one on the instance) or of another class (PEFT,
    quantisation) is not switched, and its forward is untouched afterwards."""
    from functools import partial

    from modeling_mlmamba.generation_mlmamba import fused_norms

    model = tiny_model(seed=26)
    lm = model.model.language_model
    hooked = lm.layers[0].norm
    own = hooked.forward
    hooked.forward = own  # an instance attribute, as accelerate's add_hook_to_module leaves
    lm.layers[1].norm = torch.nn.LayerNorm(lm.config.hidden_size)
    with fused_norms(lm, partial(_one_pass_rmsnorm), device_types=("cpu",)):
        assert hooked.__dict__["forward"] is own
        assert "forward" not in lm.layers[1].norm.__dict__
        assert "forward" in lm.layers[0].mixer.norm.__dict__
    assert hooked.__dict__["forward"] is own and "forward" not in lm.layers[0].mixer.norm.__dict__


@torch.no_grad()
def test_prefill_into_the_fast_path_cache_takes_the_fused_norms(monkeypatch):
    """The model's forward runs the LM under `fused_norms` when the cache is the fast path's (a prompt's first,
    eager sight: the same norms as its captured prefill), and with transformers' norms otherwise; the logits agree."""
    from functools import partial

    from modeling_mlmamba import generation_mlmamba, modeling_mlmamba

    calls = []
    kernel = partial(_one_pass_rmsnorm, calls=calls)
    monkeypatch.setattr(modeling_mlmamba, "fused_norms",
                        partial(generation_mlmamba.fused_norms, kernel=kernel, device_types=("cpu",)))
    model = tiny_model(seed=27)
    ids = image_prompt_ids(model.config, [5, 6, 7])
    pv = torch.randn(1, 6, 32, 32, generator=torch.Generator().manual_seed(6))
    plain = model(input_ids=ids, pixel_values=pv).logits
    assert calls == []
    cache = DecodeGraphRunner(model, MLMambaCausalLMOutput, compile_mode=None).cache_for(1)
    fast = model(input_ids=ids, pixel_values=pv, cache_params=cache, use_cache=True).logits
    assert len(calls) == 2 * model.config.text_config.num_hidden_layers + 1
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_fast_path_is_for_mamba2_lms_only():
    """A Cobra-style model (Mamba-1 LM) has no fast-path step: `reads_plain_weights` answers False (instead of
    failing on the Mamba-1 mixer's missing gated norm), so that `generate()` takes transformers' path on a GPU too;
    on CPU that path decodes with a static cache request as with the default cache."""
    from modeling_mlmamba.generation_mlmamba import reads_plain_weights

    mamba1 = dict(model_type="mamba", vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                  conv_kernel=4, tie_word_embeddings=True, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    model = tiny_model(seed=28, text_config=mamba1, connector_type="mlp")
    assert not reads_plain_weights(model)
    ids = image_prompt_ids(model.config, [5, 6, 7])
    pv = torch.randn(1, 6, 32, 32, generator=torch.Generator().manual_seed(7))
    outputs = [model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=5, do_sample=False, eos_token_id=None,
                              cache_implementation=cache) for cache in (None, "static")]
    assert torch.equal(outputs[0], outputs[1]) and outputs[0].shape[1] == ids.shape[1] + 5


def test_fused_norms_can_switch_only_the_named_norms():
    """`norms=[lm.norm_f]` (the decode step's final norm) switches that module alone."""
    from functools import partial

    from modeling_mlmamba.generation_mlmamba import fused_norms

    lm = tiny_model(seed=29).model.language_model
    with fused_norms(lm, partial(_one_pass_rmsnorm), device_types=("cpu",), norms=[lm.norm_f]) as switched:
        assert switched and "forward" in lm.norm_f.__dict__
        assert not any("forward" in m.__dict__ for layer in lm.layers for m in (layer.norm, layer.mixer.norm))
    assert "forward" not in lm.norm_f.__dict__


def test_prefill_chunks_split_a_prompt_into_the_ladder_lengths():
    """Written out: as many chunks of the limit as fit, then the binary digits of the rest, longest first."""
    from modeling_mlmamba.generation_mlmamba import prefill_chunks

    assert prefill_chunks(749, 512) == [512, 128, 64, 32, 8, 4, 1]
    assert prefill_chunks(1100, 512) == [512, 512, 64, 8, 4]
    assert prefill_chunks(21, 8) == [8, 8, 4, 1]
    assert prefill_chunks(5, 1) == [1, 1, 1, 1, 1]
    assert prefill_chunks(64, 64) == [64] and prefill_chunks(0, 64) == []
    for limit in (1, 2, 8, 64):
        for length in range(200):
            chunks = prefill_chunks(length, limit)
            assert sum(chunks) == length and chunks == sorted(chunks, reverse=True)
            assert all(c <= limit and c & (c - 1) == 0 for c in chunks)
            assert len([c for c in chunks if c < limit]) == len(set(c for c in chunks if c < limit))  # one of each
    for length, limit in ((-1, 8), (10, 0), (10, 6)):
        with pytest.raises(ValueError, match="power-of-two limit"):
            prefill_chunks(length, limit)


def test_prefill_chunk_limit_follows_the_environment_and_the_batch_size(monkeypatch):
    from modeling_mlmamba.generation_mlmamba import PREFILL_CHUNK_TOKENS, prefill_chunk_limit

    monkeypatch.delenv("MLMAMBA_PREFILL_CHUNK", raising=False)
    assert prefill_chunk_limit(1) == 0  # off by default
    monkeypatch.setenv("MLMAMBA_PREFILL_CHUNK", "512")
    assert PREFILL_CHUNK_TOKENS == 4096
    assert [prefill_chunk_limit(b) for b in (1, 8, 16, 64, 3, 5000)] == [512, 512, 256, 64, 512, 1]
    monkeypatch.setenv("MLMAMBA_PREFILL_CHUNK", "300")  # rounded down to a power of two
    assert prefill_chunk_limit(1) == 256
    monkeypatch.setenv("MLMAMBA_PREFILL_CHUNK", "0")
    assert prefill_chunk_limit(1) == 0
    monkeypatch.setenv("MLMAMBA_PREFILL_CHUNK", "big")
    with pytest.raises(ValueError, match="MLMAMBA_PREFILL_CHUNK must be a whole number of tokens.*'big'"):
        prefill_chunk_limit(1)


@torch.no_grad()
def test_shape_graphs_prepare_captures_ahead_and_replays_without_copies():
    """`prepare` captures a shape before its first call (once; a failed capture is remembered), `replay`
    with clone=False hands out the static outputs themselves; `limit=None` keeps every shape."""
    from modeling_mlmamba.generation_mlmamba import ShapeGraphs

    captured = []

    class Replay:
        def __init__(self, fn, static_inputs, static_outputs):
            self.fn, self.static_inputs, self.static_outputs = fn, static_inputs, static_outputs

        def replay(self):
            for out, value in zip(self.static_outputs, self.fn(*self.static_inputs)):
                out.copy_(value)

    class Fake(ShapeGraphs):
        def _capture(self, inputs):
            if inputs[0].shape[0] == 3:
                raise RuntimeError("operation not permitted when stream is capturing")
            static_inputs = tuple(t.clone() for t in inputs)
            static_outputs = tuple(self.fn(*static_inputs))
            captured.append(tuple(inputs[0].shape))
            return Replay(self.fn, static_inputs, static_outputs), static_inputs, static_outputs

    graphs = Fake(lambda x: (x + 1,), limit=None)
    shapes = [torch.zeros(n, 2) for n in (1, 2, 4, 5, 6)]
    assert all(graphs.prepare(x) for x in shapes) and captured == [(1, 2), (2, 2), (4, 2), (5, 2), (6, 2)]
    assert graphs.prepare(shapes[0]) and len(captured) == 5  # already there: not captured again
    assert not graphs.prepare(torch.zeros(3, 2)) and not graphs.prepare(torch.zeros(3, 2))
    assert graphs.failed == {ShapeGraphs.key((torch.zeros(3, 2),))} and ShapeGraphs.key((torch.zeros(3, 2),)) not in graphs.graphs
    assert ShapeGraphs.key((torch.ones(2, 2),)) in graphs.graphs and len(graphs.graphs) == 5
    (out,) = graphs.replay(torch.full((2, 2), 4.0), clone=False)
    assert torch.equal(out, torch.full((2, 2), 5.0)) and out is graphs.graphs[ShapeGraphs.key((out,))][2][0]
    (copy,) = graphs.replay(torch.full((2, 2), 7.0))
    assert torch.equal(copy, torch.full((2, 2), 8.0)) and copy is not out and torch.equal(out, copy)


@torch.no_grad()
def test_chunked_prefill_continues_the_cache_like_a_whole_prefill(monkeypatch):
    """The fast path's prefill from the chunk ladder (the graphs replaced by eager runs of the same function, whose
    outputs every later replay overwrites, as graphs sharing a memory pool may): hidden states and the states left in
    the cache equal transformers' prefill of the whole prompt on a fresh cache. 21 tokens, ladder up to 8: chunks of
    8, 8, 4 and 1 (the last through transformers' single-token path)."""
    from transformers import DynamicCache

    monkeypatch.setenv("MLMAMBA_PREFILL_CHUNK", "8")  # on; the ladder is not captured without CUDA all the same
    model = tiny_model(seed=29)
    lm = model.model.language_model
    runner = DecodeGraphRunner(model, MLMambaCausalLMOutput, compile_mode=None)
    cache = runner.cache_for(2)
    assert runner.chunk_limits == {} and not runner.chunk_graphs.graphs  # no ladder without CUDA

    buffers = {}

    class EagerLadder:  # stands for the captured ladder
        calls = []

        def replay(self, embeds, clone=True):
            assert clone is False
            runner._mark_continuing(embeds)
            (hidden,) = runner._lm_prefill(embeds)
            for other in buffers.values():  # the shared pool: another graph's output memory is overwritten
                other.fill_(float("nan"))
            out = buffers.setdefault(embeds.shape[1], torch.empty_like(hidden))
            out.copy_(hidden)
            self.calls.append(embeds.shape[1])
            return (out,)

    runner.chunk_graphs = EagerLadder()
    runner.chunk_limits[2] = 8
    embeds = torch.randn(2, 21, lm.config.hidden_size, generator=torch.Generator().manual_seed(8))
    hidden = runner._chunked_prefill(embeds)
    assert EagerLadder.calls == [8, 8, 4, 1]

    reference_cache = DynamicCache(config=lm.config)
    reference = lm(inputs_embeds=embeds, cache_params=reference_cache, use_cache=True).last_hidden_state
    torch.testing.assert_close(hidden, reference, atol=1e-5, rtol=1e-5)
    for index, mine in enumerate(cache.layers):
        torch.testing.assert_close(mine.conv_states[0], reference_cache.layers[index].conv_states[0],
                                   atol=1e-6, rtol=1e-5, msg=f"conv state, layer {index}")
        torch.testing.assert_close(mine.recurrent_states[0], reference_cache.layers[index].recurrent_states[0],
                                   atol=1e-6, rtol=1e-5, msg=f"SSM state, layer {index}")
    assert runner._chunked_prefill(torch.zeros(1, 4, lm.config.hidden_size)) is None  # no ladder for batch 1


def _random_pending(lm, batch, K, n, seed):
    """PendingSteps over `lm`'s shapes with n steps in its buffers (random x, B; dt > 0) and n on its count."""
    generator = torch.Generator().manual_seed(seed)
    pending = PendingSteps(len(lm.layers), batch, K, _block_shape(lm), torch.float32, "cpu")
    pending.x.copy_(torch.randn(pending.x.shape, generator=generator))
    pending.b.copy_(torch.randn(pending.b.shape, generator=generator))
    pending.dt.copy_(torch.rand(pending.dt.shape, generator=generator) * 0.5 + 0.01)
    pending.count.fill_(n)
    pending.steps = n
    return pending


def _fold_by_recurrence(states, pending, lm, n):
    """The reference: Mamba-2's state recurrence, one buffered step after the other (h = exp(A dt) h + dt x B^T, A =
    -exp(A_log) per head, B per group of heads), on copies of `states`."""
    config = lm.config
    heads_per_group = config.num_heads // config.n_groups
    folded = []
    for index, state in enumerate(states):
        h = state.clone().double()
        A = -torch.exp(lm.layers[index].mixer.A_log.double())
        for j in range(n):
            for b in range(h.shape[0]):
                for head in range(config.num_heads):
                    dt = pending.dt[index, b, j, head].double()
                    x = pending.x[index, b, j].double().view(config.num_heads, config.head_dim)[head]
                    group = head // heads_per_group
                    B = pending.b[index, b, j].double().view(config.n_groups, config.state_size)[group]
                    h[b, head] = torch.exp(A[head] * dt) * h[b, head] + dt * torch.outer(x, B)
        folded.append(h.to(state.dtype))
    return folded


@pytest.mark.parametrize("text_overrides", [dict(), dict(n_groups=2, num_heads=4)], ids=["released", "two-groups"])
@torch.no_grad()
def test_pending_steps_fold_equals_the_recurrence_step_by_step(text_overrides):
    """`PendingSteps.fold` (the decode steps whose state writes the fused layer deferred, put into the states at once)
    against the recurrence run one step at a time; a whole round (steps a multiple of K) is already in the states and
    folds nothing."""
    lm = tiny_model(seed=31, text_config=tiny_text_config(**text_overrides)).model.language_model
    config = lm.config
    generator = torch.Generator().manual_seed(32)
    states = [torch.randn(2, config.num_heads, config.head_dim, config.state_size, generator=generator)
              for _ in lm.layers]
    pending = _random_pending(lm, batch=2, K=8, n=5, seed=33)
    expected = _fold_by_recurrence(states, pending, lm, 5)
    pending.fold(states, [layer.mixer.A_log for layer in lm.layers])
    for index, (got, want) in enumerate(zip(states, expected)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"layer {index}")
    assert pending.pending == 0 and pending.steps == 0 and int(pending.count) == 0
    pending = _random_pending(lm, batch=2, K=8, n=16, seed=34)
    before = [state.clone() for state in states]
    pending.fold(states, [layer.mixer.A_log for layer in lm.layers])
    assert all(torch.equal(a, b) for a, b in zip(states, before))


def test_deferred_steps_follow_the_environment(monkeypatch):
    monkeypatch.delenv("MLMAMBA_DEFER_STEPS", raising=False)
    assert deferred_steps(1) == 16 and deferred_steps(2) == deferred_steps(16) == 8
    for value, expected in (("0", 0), ("1", 0), ("8", 8), ("32", 32)):
        monkeypatch.setenv("MLMAMBA_DEFER_STEPS", value)
        assert deferred_steps(1) == deferred_steps(8) == expected
    for value in ("12", "many"):
        monkeypatch.setenv("MLMAMBA_DEFER_STEPS", value)
        with pytest.raises(ValueError, match="MLMAMBA_DEFER_STEPS must be a power of two"):
            deferred_steps(1)


def test_state_writes_are_deferred_wherever_the_fused_layer_runs(monkeypatch):
    """Batches 1 to the fused layer's largest defer their writes; larger batches (the compiled layer) and
    MLMAMBA_DEFER_STEPS=0 do not."""
    monkeypatch.delenv("MLMAMBA_DEFER_STEPS", raising=False)
    assert defer_state_writes(1, 1) and defer_state_writes(1, 16)
    assert defer_state_writes(8, 16) and defer_state_writes(16, 16)
    assert not defer_state_writes(8, 1) and not defer_state_writes(17, 16)
    monkeypatch.setenv("MLMAMBA_DEFER_STEPS", "0")
    assert not defer_state_writes(1, 16) and not defer_state_writes(8, 16)


@torch.no_grad()
def test_an_eager_forward_on_a_fast_path_cache_settles_its_pending_steps():
    """A fast-path cache whose decode steps have deferred their state writes (here 3 steps put in its buffers by
    hand) is settled before an eager forward reads it: the logits equal those of a cache whose states had the
    same steps applied one by one, and nothing is left pending."""
    model = tiny_model(seed=35)
    lm = model.model.language_model
    next_ids, (cache, reference_cache) = _prefilled(model)
    pending = _random_pending(lm, batch=2, K=16, n=3, seed=36)
    cache._mlmamba_pending = pending
    folded = _fold_by_recurrence([layer.recurrent_states[0] for layer in reference_cache.layers], pending, lm, 3)
    for layer, state in zip(reference_cache.layers, folded):
        layer.recurrent_states[0].copy_(state)
    reference = model(input_ids=next_ids, cache_params=reference_cache, use_cache=True).logits
    got = model(input_ids=next_ids, cache_params=cache, use_cache=True).logits
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    assert pending.pending == 0
    for mine, theirs in zip(cache.layers, reference_cache.layers):
        torch.testing.assert_close(mine.recurrent_states[0], theirs.recurrent_states[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_capture_puts_back_the_states_and_the_pending_steps_it_ran_over():
    """Warm-up and capture run the decode step on a live cache; what `_capture` saves first (`_save`: the states, the
    pending buffers and counts) `_restore` puts back, values and the host's count alike."""
    model = tiny_model(seed=37)
    lm = model.model.language_model
    _, (cache, _) = _prefilled(model)
    pending = _random_pending(lm, batch=2, K=16, n=3, seed=38)
    cache._mlmamba_pending = pending
    before = [(layer.conv_states[0].clone(), layer.recurrent_states[0].clone()) for layer in cache.layers]
    buffers = [t.clone() for t in (pending.x, pending.dt, pending.b, pending.count)]
    saved = DecodeGraphRunner._save(cache)
    for layer in cache.layers:  # what running the step does to them
        layer.conv_states[0].add_(1.0)
        layer.recurrent_states[0].mul_(0.5)
    for t in (pending.x, pending.dt, pending.b):
        t.add_(1.0)
    pending.count.add_(4)
    pending.steps += 4
    DecodeGraphRunner._restore(cache, saved)
    for layer, (conv, ssm) in zip(cache.layers, before):
        assert torch.equal(layer.conv_states[0], conv) and torch.equal(layer.recurrent_states[0], ssm)
    assert all(torch.equal(a, b) for a, b in zip((pending.x, pending.dt, pending.b, pending.count), buffers))
    assert pending.steps == 3
