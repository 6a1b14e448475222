"""The fused decode layer (three Triton kernels, generation_mlmamba.py; matrix-vector products for one sequence,
16-row tensor-core products for 2-16) against the torch layer function.

Reference: `make_block_step` with transformers' Mamba-2 conv / state-update functions (its torch reference on CPU;
on a GPU with mamba_ssm and causal_conv1d installed, transformers dispatches them to those kernels), itself tested
against transformers' `Mamba2Model` token by token in test_decode_step.py: same inputs, same states, several tokens
in a row. Runs on a CUDA GPU with
Triton; on CPU only under Triton's interpreter (`TRITON_INTERPRET=1`, with Triton and numpy < 2 installed: not part of
the CPU test run, whose environment has neither), unautotuned with small blocks so that every loop and mask is used.
"""

from __future__ import annotations

import os

import pytest
import torch
from tests.tiny import tiny_model, tiny_text_config

from modeling_mlmamba.generation_mlmamba import (
    ChainedInput,
    PendingSteps,
    _block_shape,
    _fused_kernels,
    _torch_conv_update,
    _torch_state_update,
    make_block_step,
    make_fused_block_step,
)

ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401
except Exception:
    triton = None
pytestmark = pytest.mark.skipif(
    triton is None or not (ON_GPU or INTERPRETED), reason="needs Triton, and a CUDA GPU or TRITON_INTERPRET=1"
)


def _tiny_lm(seed, text_overrides, device, dtype, offset=0):
    """A tiny model's LM on `device` in `dtype`, its 1-d parameters (norm weights, biases, D, dt_bias, A_log) moved off
    their initial values so that every one of them matters."""
    model = tiny_model(seed=seed, text_config=tiny_text_config(**text_overrides)).to(device, dtype)
    lm = model.model.language_model
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + offset)).to(p) * 0.1)
    return lm


def _layer_inputs(lm, layer_index, dtype, device, generator, batch=1):
    layer = lm.layers[layer_index]
    mixer = layer.mixer
    weights = (layer.norm.weight, mixer.in_proj.weight, mixer.in_proj.bias, mixer.conv1d.weight, mixer.conv1d.bias,
               mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight, mixer.out_proj.weight, mixer.out_proj.bias)
    config = lm.config
    hidden = config.hidden_size
    conv_dim = int(config.expand * hidden) + 2 * config.n_groups * config.state_size
    residual_dtype = torch.float32 if config.residual_in_fp32 else dtype
    residual = torch.randn(batch, 1, hidden, generator=generator).to(device, residual_dtype)
    out = torch.randn(batch, 1, hidden, generator=generator).to(device, dtype)
    conv_state = torch.randn(batch, conv_dim, config.conv_kernel, generator=generator).to(device, dtype)
    ssm_state = torch.randn(batch, config.num_heads, config.head_dim, config.state_size, generator=generator)
    ssm_state = ssm_state.to(device)
    return weights, residual, out, conv_state, ssm_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3], ids=["one-sequence", "three-sequences"])
@pytest.mark.parametrize("split_k", [1, 3], ids=["whole-rows", "split-k"])
@pytest.mark.parametrize(
    "text_overrides",
    [dict(), dict(residual_in_fp32=False), dict(n_groups=2, num_heads=4, head_dim=24, use_bias=True, hidden_size=48)],
    ids=["released", "bf16-residual", "two-groups-bias-odd-head-dim"],
)
@torch.no_grad()
def test_fused_layer_steps_like_the_torch_layer(dtype, batch, split_k, text_overrides):
    if INTERPRETED and batch > 1 and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter multiplies bf16 tiles (tl.dot) as raw bits; runs on the GPU")
    device = "cuda" if ON_GPU else "cpu"
    lm = _tiny_lm(5, text_overrides, device, dtype)
    reference = make_block_step(lm, kernels=(_torch_conv_update, _torch_state_update, ("torch", "torch")))
    if ON_GPU and not INTERPRETED and split_k == 1:
        fused = make_fused_block_step(lm)  # autotuned
    else:  # no autotuning, blocks smaller than the sizes so that the loops and masks run; out_proj's columns split
        # in 3 (one share empty for the tiny model: it must add nothing)
        fused = make_fused_block_step(lm, kernels=_fused_kernels(autotune=False),
                                      block_sizes=dict(BLOCK_N=16, BLOCK_K=16, SPLIT_K=split_k))
    assert fused is not None
    generator = torch.Generator().manual_seed(7)
    for layer_index in range(len(lm.layers)):
        weights, residual, out, conv_state, ssm_state = _layer_inputs(lm, layer_index, dtype, device, generator,
                                                                      batch)
        states = [(conv_state.clone(), ssm_state.clone()) for _ in range(2)]
        for step in range(3):  # tokens in a row: each call advances its copy of the states
            expected = reference(residual, out, *states[0], *weights)
            got = fused(residual, out, *states[1], *weights)
            tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
            for name, a, b in zip(("residual", "output"), got, expected):
                assert a.shape == b.shape and a.dtype == b.dtype, name
                torch.testing.assert_close(a, b, **tol, msg=f"{name}, layer {layer_index}, token {step}")
            torch.testing.assert_close(states[1][0], states[0][0], **tol, msg="conv state")
            torch.testing.assert_close(states[1][1], states[0][1], **tol, msg="SSM state")
            residual, out = expected


def test_fused_layer_refuses_a_batch_it_does_not_take():
    device = "cuda" if ON_GPU else "cpu"
    model = tiny_model(seed=5).to(device)
    lm = model.model.language_model
    fused = make_fused_block_step(lm, kernels=_fused_kernels(autotune=False), block_sizes=dict(BLOCK_N=16,
                                                                                              BLOCK_K=16))
    weights, residual, out, conv_state, ssm_state = _layer_inputs(lm, 0, torch.float32, device, torch.Generator())
    with pytest.raises(ValueError, match="one token of 1 to 16 sequences"):
        fused(residual.expand(17, 1, -1), out.expand(17, 1, -1), conv_state.expand(17, -1, -1),
              ssm_state.expand(17, -1, -1, -1), *weights)
    with pytest.raises(ValueError, match="one token of 1 to 16 sequences"):
        fused(residual.expand(1, 2, -1), out.expand(1, 2, -1), conv_state, ssm_state, *weights)
    chained = ChainedInput(out, torch.ones(1, 2, device=device))  # only 2-16 sequences are chained
    with pytest.raises(ValueError, match="for 2-16 sequences only"):
        fused(residual, chained, conv_state, ssm_state, *weights)


@pytest.mark.parametrize("name,value,message", [
    ("MLMAMBA_DEFER_FOLD_COLS", "24", "MLMAMBA_DEFER_FOLD_COLS must be 0 or a power of two, got '24'"),
    ("MLMAMBA_DEFER_FOLD_COLS", "-8", "MLMAMBA_DEFER_FOLD_COLS must be 0 or a power of two, got '-8'"),
    ("MLMAMBA_DEFER_B_LATE", "yes", "MLMAMBA_DEFER_B_LATE must be 0, 1 or 2, got 'yes'"),
    ("MLMAMBA_DEFER_B_LATE", "3", "MLMAMBA_DEFER_B_LATE must be 0, 1 or 2, got '3'"),
])
def test_fused_layer_checks_its_write_back_settings(name, value, message, monkeypatch):
    monkeypatch.setenv(name, value)
    lm = tiny_model(seed=5).model.language_model
    with pytest.raises(ValueError, match=message):
        make_fused_block_step(lm, kernels=_fused_kernels(autotune=False))


@pytest.mark.parametrize("prefetch", [True, False], ids=["next-tile-in-flight", "software-pipelined"])
@pytest.mark.parametrize("batch", [1, 2])
@torch.no_grad()
def test_fused_layer_takes_a_configuration_per_product(batch, prefetch):
    """block_sizes={"in_proj": {...}, "out_proj": {...}}: each product launched with its own meta-parameters (as
    TUNED_CONFIGS does), with the next weight tile loaded by the kernel or left to Triton's pipelining, against the
    torch layer; a dict naming anything else is refused."""
    device = "cuda" if ON_GPU else "cpu"
    model = tiny_model(seed=9).to(device)
    lm = model.model.language_model
    reference = make_block_step(lm, kernels=(_torch_conv_update, _torch_state_update, ("torch", "torch")))
    configs = {"in_proj": dict(BLOCK_N=32, BLOCK_K=16, PREFETCH=prefetch, num_warps=4, num_stages=3),
               "out_proj": dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, PREFETCH=prefetch, num_warps=2)}
    fused = make_fused_block_step(lm, kernels=_fused_kernels(autotune=False), block_sizes=configs)
    weights, residual, out, conv_state, ssm_state = _layer_inputs(lm, 1, torch.float32, device,
                                                                  torch.Generator().manual_seed(3), batch)
    states = [(conv_state.clone(), ssm_state.clone()) for _ in range(2)]
    expected = reference(residual, out, *states[0], *weights)
    got = fused(residual, out, *states[1], *weights)
    for a, b in zip(got + states[1], expected + states[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'in_proj' and 'out_proj'"):
        make_fused_block_step(lm, kernels=_fused_kernels(autotune=False), block_sizes={"in_proj": configs["in_proj"]})


@torch.no_grad()
def test_fused_layer_with_a_bfloat16_state_steps_like_a_float32_state_rounded():
    """config.ssm_state_dtype="bfloat16": the kernel reads the bf16 state, updates it in float32, computes the output
    from the float32 update and stores the state rounded to bf16, as mamba_ssm's kernel does. Reference: the torch
    layer on the same state held in float32, its new state rounded to bf16."""
    device = "cuda" if ON_GPU else "cpu"
    model = tiny_model(seed=6).to(device)
    lm = model.model.language_model
    reference = make_block_step(lm, kernels=(_torch_conv_update, _torch_state_update, ("torch", "torch")))
    fused = make_fused_block_step(lm, kernels=_fused_kernels(autotune=False), block_sizes=dict(BLOCK_N=16,
                                                                                              BLOCK_K=16))
    weights, residual, out, conv_state, ssm_state = _layer_inputs(lm, 1, torch.float32, device,
                                                                  torch.Generator().manual_seed(8))
    state16 = ssm_state.bfloat16()
    initial, state32 = state16.clone(), state16.float()
    conv = [conv_state.clone(), conv_state.clone()]
    expected = reference(residual, out, conv[0], state32, *weights)
    got = fused(residual, out, conv[1], state16, *weights)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert state16.dtype == torch.bfloat16
    # to one bf16 rounding step: the float32 values differ in their last bits, and Triton's interpreter converts to
    # bf16 by truncation where the GPU rounds to nearest
    torch.testing.assert_close(state16.float(), state32.bfloat16().float(), atol=1e-6, rtol=2**-7)
    assert not torch.equal(state16, initial), "the state did not move"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_config", [dict(BLOCK_N=16, SPLIT_K=1), dict(BLOCK_N=8, SPLIT_K=3)],
                         ids=["whole-rows", "split-k"])
@pytest.mark.parametrize(
    "text_overrides",
    [dict(num_hidden_layers=3), dict(num_hidden_layers=3, residual_in_fp32=False),
     dict(n_groups=2, num_heads=4, head_dim=24, use_bias=True, hidden_size=48)],
    ids=["released", "bf16-residual", "two-groups-bias-odd-head-dim"],
)
@torch.no_grad()
def test_chained_fused_layers_step_like_the_torch_layers(dtype, out_config, text_overrides):
    """2-16 rows with `next_norm_w`: each layer's out_proj forms the next layer's input (ChainedInput: h scaled by
    the next norm's weight, and the sums of squares that give its RMS) and the next in_proj takes it as it is. The
    layers of a tiny LM chained over three tokens against the torch layer function layer by layer: every handed-over
    value against the one formed from the torch layer's (residual, output), the states, and the last layer's
    (residual, output), which it returns unchained."""
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter multiplies bf16 tiles (tl.dot) as raw bits; runs on the GPU")
    device = "cuda" if ON_GPU else "cpu"
    lm = _tiny_lm(11, text_overrides, device, dtype, offset=1)
    reference = make_block_step(lm, kernels=(_torch_conv_update, _torch_state_update, ("torch", "torch")))
    configs = {"in_proj": dict(BLOCK_N=16, BLOCK_K=16, PREFETCH=False, num_stages=2),
               "out_proj": dict(BLOCK_K=16, PREFETCH=False, num_stages=2, **out_config)}
    fused = make_fused_block_step(lm, kernels=_fused_kernels(autotune=False), block_sizes=configs)
    generator = torch.Generator().manual_seed(12)
    batch = 3
    layers = [_layer_inputs(lm, i, dtype, device, generator, batch) for i in range(len(lm.layers))]
    states = [[(conv.clone(), ssm.clone()) for _, _, _, conv, ssm in layers] for _ in range(2)]
    residual, out = layers[0][1], layers[0][2]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for step in range(3):
        expected, got = (residual, out), (residual, out)
        for index, (weights, *_) in enumerate(layers):
            last = index == len(layers) - 1
            expected = reference(*expected, *states[0][index], *weights)
            got = fused(*got, *states[1][index], *weights,
                        next_norm_w=None if last else layers[index + 1][0][0])
            where = f"layer {index}, token {step}"
            torch.testing.assert_close(states[1][index][0], states[0][index][0], **tol, msg=f"conv state, {where}")
            torch.testing.assert_close(states[1][index][1], states[0][index][1], **tol, msg=f"SSM state, {where}")
            if last:
                for name, a, b in zip(("residual", "output"), got, expected):
                    assert a.shape == b.shape and a.dtype == b.dtype, name
                    torch.testing.assert_close(a, b, **tol, msg=f"{name}, {where}")
                continue
            # the next block's input and its norm, from the torch layer's results
            h = expected[0] + expected[1]
            h = h.float() if lm.config.residual_in_fp32 else h
            x = h.to(dtype).float()
            next_norm_w = layers[index + 1][0][0]
            residual_got, chained = got
            assert isinstance(chained, ChainedInput)
            torch.testing.assert_close(residual_got, h, **tol, msg=f"residual, {where}")
            torch.testing.assert_close(chained.normed, (next_norm_w.float() * x).to(dtype), **tol,
                                       msg=f"normed input, {where}")
            assert chained.squares.shape == (batch, -(-lm.config.hidden_size // out_config["BLOCK_N"]))
            torch.testing.assert_close(chained.squares.sum(-1), x.pow(2).sum(-1).view(batch), **tol,
                                       msg=f"sums of squares, {where}")
        residual, out = expected
    assert not torch.equal(states[1][0][1], layers[0][4]), "the SSM state did not move"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3], ids=["one-sequence", "three-sequences"])
@pytest.mark.parametrize(
    "text_overrides", [dict(), dict(n_groups=2, num_heads=4, head_dim=24, use_bias=True, hidden_size=48)],
    ids=["released", "two-groups-bias-odd-head-dim"],
)
@pytest.mark.parametrize(
    "variant",
    [{}, {"MLMAMBA_DEFER_FOLD_COLS": "8", "MLMAMBA_DEFER_B_LATE": "1"},
     {"MLMAMBA_DEFER_FOLD_COLS": "8", "MLMAMBA_DEFER_B_LATE": "2"},
     {"MLMAMBA_DEFER_FOLD_COLS": "0", "MLMAMBA_DEFER_B_LATE": "0"}],
    ids=["default", "sliced-write-back-late-B", "sliced-write-back-late-steps", "whole-tile-write-back"],
)
@torch.no_grad()
def test_fused_layer_with_deferred_state_writes_steps_like_the_torch_layer(dtype, batch, text_overrides, variant,
                                                                          monkeypatch):
    """`pending` (DeferredUpdates, K = 4): the SSM state is written back every K-th step only. Over 2K + 3 tokens in
    a row the outputs and conv states agree with the torch layer's at every token; the SSM state in memory stays
    as it was between write-backs and equals the torch layer's state after each K-th token; after the last token
    `PendingSteps.fold` brings it to the torch layer's current state (3 steps pending). By default the write-back
    is on the whole state tile at batch 1 and in column slices with the buffered B read late at 2-16; also each of
    the two at every batch size (slices of 8 state columns here)."""
    if INTERPRETED and batch > 1 and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter multiplies bf16 tiles (tl.dot) as raw bits; runs on the GPU")
    device = "cuda" if ON_GPU else "cpu"
    lm = _tiny_lm(9, text_overrides, device, dtype, offset=2)
    reference = make_block_step(lm, kernels=(_torch_conv_update, _torch_state_update, ("torch", "torch")))
    for name, value in variant.items():  # read when the fused layer is made
        monkeypatch.setenv(name, value)
    fused = make_fused_block_step(lm, kernels=_fused_kernels(autotune=False), block_sizes=dict(BLOCK_N=16,
                                                                                              BLOCK_K=16))
    weights, residual, out, conv_state, ssm_state = _layer_inputs(lm, 1, dtype, device,
                                                                  torch.Generator().manual_seed(10), batch)
    states = [(conv_state.clone(), ssm_state.clone()) for _ in range(2)]
    K = 4
    pending = PendingSteps(1, batch, K, _block_shape(lm), dtype, device)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    written = ssm_state.clone()
    for step in range(2 * K + 3):
        expected = reference(residual, out, *states[0], *weights)
        got = fused(residual, out, *states[1], *weights, pending=pending.layer(0))
        pending.count.add_(1)  # what the decode step does after its last layer
        pending.steps += 1
        for name, a, b in zip(("residual", "output"), got, expected):
            torch.testing.assert_close(a, b, **tol, msg=f"{name}, token {step}")
        torch.testing.assert_close(states[1][0], states[0][0], **tol, msg=f"conv state, token {step}")
        if (step + 1) % K:
            assert torch.equal(states[1][1], written), f"the SSM state was written at token {step}"
        else:
            torch.testing.assert_close(states[1][1], states[0][1], **tol, msg=f"SSM state, token {step}")
            assert not torch.equal(states[1][1], written), f"the SSM state was not written at token {step}"
            written = states[1][1].clone()
        residual, out = expected
    assert pending.pending == 3
    pending.fold([states[1][1]], [weights[6]])
    torch.testing.assert_close(states[1][1], states[0][1], **tol, msg="SSM state after fold")
    assert pending.pending == 0 and int(pending.count) == 0
