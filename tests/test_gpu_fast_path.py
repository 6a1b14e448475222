"""The fast path (static state cache + CUDA-graph decode step) decodes exactly what the plain path decodes.

Needs CUDA; skipped elsewhere. The reference is `generate()` with transformers' default `DynamicCache`, run
eagerly, one kernel at a time; the fast path is `generate(..., cache_implementation="static")`, which replays a
captured (and, unless `backend="eager"`, compiled) decode step. float32, so that no near-tie of the arg-max can
flip: the two paths must agree token for token.
"""

from __future__ import annotations

import pytest
import torch

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast path needs a CUDA GPU")

NEW_TOKENS = 48


def small_gpu_model(dtype=torch.float32) -> MLMambaForConditionalGeneration:
    """Released structure at a small width, sized so that mamba_ssm's kernels see real head / state sizes."""
    vision = [
        dict(model_type="dinov2_with_registers", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_register_tokens=4, patch_size=14, image_size=112, mlp_ratio=2),
        dict(model_type="siglip_vision_model", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=2, patch_size=14, image_size=112),
    ]
    text = dict(model_type="mamba2", vocab_size=512, hidden_size=256, num_hidden_layers=4, state_size=128,
                expand=2, head_dim=64, num_heads=8, n_groups=1, conv_kernel=4, chunk_size=64,
                tie_word_embeddings=True, pad_token_id=0, eos_token_id=0, bos_token_id=0, residual_in_fp32=True)
    config = MLMambaConfig(vision_config=vision, text_config=text, image_token_id=511, connector_hidden_size=256,
                           projector_hidden_size=512)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MLMambaForConditionalGeneration(config)
    return model.to(dtype).eval()


def prompt(model, batch_size: int):
    config = model.config
    generator = torch.Generator().manual_seed(batch_size)
    text = torch.randint(1, 500, (batch_size, 12), generator=generator)
    image = torch.full((batch_size, config.num_image_tokens), config.image_token_id)
    input_ids = torch.cat([image, text], dim=1).cuda()
    pixel_values = torch.randn(batch_size, 6, config.image_size, config.image_size, generator=generator).cuda()
    return dict(input_ids=input_ids, pixel_values=pixel_values.to(model.dtype))


def greedy(model, inputs, **kwargs):
    # eos_token_id=None: decode the full length whatever the random weights emit
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, **kwargs)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager-kernels"])
@torch.no_grad()
def test_fast_path_greedy_output_equals_the_plain_path(batch_size, compiled):
    from transformers import CompileConfig

    model = small_gpu_model()
    inputs = prompt(model, batch_size)
    reference = greedy(model, inputs)  # DynamicCache, eager
    compile_config = CompileConfig() if compiled else CompileConfig(backend="eager")
    fast = greedy(model, inputs, cache_implementation="static", compile_config=compile_config)
    assert model._decode_graphs.graphs, "the fast path did not capture a decode graph"
    assert fast.shape == reference.shape
    mismatch = (fast != reference).nonzero()
    assert mismatch.numel() == 0, f"first mismatch at (row, position) {mismatch[0].tolist()}"
    # a second call reuses the cache and the graph, and still decodes the same
    again = greedy(model, inputs, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(again, reference)


@torch.no_grad()
def test_batch_one_fused_and_compiled_layers_decode_the_same(monkeypatch):
    """At batch 1 the step runs each layer as three fused Triton kernels (when Triton is there); with
    MLMAMBA_FUSED_DECODE=0 it runs the compiled layer. Both decode what the plain path decodes."""
    from modeling_mlmamba.generation_mlmamba import fused_kernels

    if fused_kernels() is None:
        pytest.skip("no Triton here")
    model = small_gpu_model()
    inputs = prompt(model, 1)
    reference = greedy(model, inputs)
    fused = greedy(model, inputs, cache_implementation="static")
    assert model._decode_graphs._fused, "batch 1 did not take the fused layer"
    monkeypatch.setenv("MLMAMBA_FUSED_DECODE", "0")
    model._decode_graphs = None
    compiled = greedy(model, inputs, cache_implementation="static")
    assert model._decode_graphs._fused is False
    assert torch.equal(fused, reference) and torch.equal(compiled, reference)


@torch.no_grad()
def test_fused_layer_for_a_few_rows_decodes_like_the_plain_path(monkeypatch):
    """MLMAMBA_FUSED_DECODE_MAX_BATCH=16: batch 3 takes the fused layer's tensor-core kernels (16-row tiles)."""
    from modeling_mlmamba.generation_mlmamba import fused_kernels

    if fused_kernels() is None:
        pytest.skip("no Triton here")
    monkeypatch.setenv("MLMAMBA_FUSED_DECODE_MAX_BATCH", "16")
    model = small_gpu_model()
    inputs = prompt(model, 3)
    reference = greedy(model, inputs)
    fast = greedy(model, inputs, cache_implementation="static")
    assert model._decode_graphs.fused_max_batch == 16 and model._decode_graphs._fused
    mismatch = (fast != reference).nonzero()
    assert mismatch.numel() == 0, f"first mismatch at (row, position) {mismatch[0].tolist()}"


@torch.no_grad()
def test_tuned_row_configurations_make_the_fused_layer_the_default_for_a_few_rows(monkeypatch):
    """Without MLMAMBA_FUSED_DECODE_MAX_BATCH, batches of 2-16 take the fused layer only where TUNED_CONFIGS has its
    tensor-core kernels for this GPU and these shapes; launched with those configurations, it still decodes what the
    plain path decodes."""
    from modeling_mlmamba import generation_mlmamba

    if generation_mlmamba.fused_kernels() is None:
        pytest.skip("no Triton here")
    monkeypatch.delenv("MLMAMBA_FUSED_DECODE_MAX_BATCH", raising=False)
    model = small_gpu_model()
    inputs = prompt(model, 3)
    reference = greedy(model, inputs)
    greedy(model, inputs, cache_implementation="static")
    assert model._decode_graphs.fused_max_batch == 1, "untuned shapes: batch 3 runs the compiled layer"
    mixer = model.model.language_model.layers[0].mixer
    tuned = dict(generation_mlmamba.TUNED_CONFIGS)
    for product, weight, config in (
        ("in_proj", mixer.in_proj.weight, dict(BLOCK_N=64, BLOCK_K=32, PREFETCH=False, num_stages=3)),
        ("out_proj", mixer.out_proj.weight, dict(BLOCK_N=64, BLOCK_K=32, SPLIT_K=2, PREFETCH=False)),
    ):
        tuned[generation_mlmamba._tuned_key(weight.device, product, "rows", weight)] = config
    monkeypatch.setattr(generation_mlmamba, "TUNED_CONFIGS", tuned)
    model._decode_graphs = None
    fast = greedy(model, inputs, cache_implementation="static")
    assert model._decode_graphs.fused_max_batch == 16 and model._decode_graphs._fused
    mismatch = (fast != reference).nonzero()
    assert mismatch.numel() == 0, f"first mismatch at (row, position) {mismatch[0].tolist()}"


@pytest.mark.parametrize("batch_size", [1, 3])
@torch.no_grad()
def test_fused_layer_defers_state_writes_and_hands_back_the_true_states(batch_size, monkeypatch):
    """The fused layer writes the SSM states back every K decode steps (DeferredUpdates; K = 16 at batch 1, 8 at
    2-16): greedy output equals the plain path's, with and without (MLMAMBA_DEFER_STEPS=0); a cache handed back by
    `generate()` (`return_dict_in_generate`, 47 decode steps: 15 / 7 still pending when the loop ends) holds the
    plain path's states."""
    from modeling_mlmamba.generation_mlmamba import fused_kernels

    if fused_kernels() is None:
        pytest.skip("no Triton here")
    monkeypatch.setenv("MLMAMBA_FUSED_DECODE_MAX_BATCH", "16")
    model = small_gpu_model()
    inputs = prompt(model, batch_size)
    reference = greedy(model, inputs, return_dict_in_generate=True)
    fast = greedy(model, inputs, cache_implementation="static", return_dict_in_generate=True)
    runner = model._decode_graphs
    pending = runner.caches[batch_size]._mlmamba_pending
    assert runner._fused and pending.length == (16 if batch_size == 1 else 8)
    assert pending.steps == 0 and int(pending.count) == 0, "the handed-back cache was not settled"
    mismatch = (fast.sequences != reference.sequences).nonzero()
    assert mismatch.numel() == 0, f"first mismatch at (row, position) {mismatch[0].tolist()}"
    monkeypatch.setenv("MLMAMBA_DEFER_STEPS", "0")
    model._decode_graphs = None
    every_step = greedy(model, inputs, cache_implementation="static", return_dict_in_generate=True)
    assert not hasattr(model._decode_graphs.caches[batch_size], "_mlmamba_pending")
    assert torch.equal(every_step.sequences, reference.sequences)
    # the same kernels writing the states every step: equal to float32 roundings; the plain path (its own kernels,
    # other summation orders) to what 47 steps of those roundings add up to
    for index, (mine, same, theirs) in enumerate(zip(fast.past_key_values.layers, every_step.past_key_values.layers,
                                                     reference.past_key_values.layers)):
        for name, error, bound in (
            ("SSM state vs written every step", _relative_error(mine.recurrent_states[0], same.recurrent_states[0]),
             1e-5),
            ("SSM state vs plain path", _relative_error(mine.recurrent_states[0], theirs.recurrent_states[0]), 1e-4),
            ("conv state vs plain path", _relative_error(mine.conv_states[0], theirs.conv_states[0]), 1e-4),
        ):
            assert error < bound, f"{name}, layer {index}: relative error {error:.2e}"
    # with the bf16 state too (K = 16 at batch 1, 8 at 2-16)
    monkeypatch.delenv("MLMAMBA_DEFER_STEPS")
    model.config.ssm_state_dtype = "bfloat16"
    runner = model._decode_graphs
    assert runner.cache_for(1)._mlmamba_pending.length == 16 and runner.cache_for(3)._mlmamba_pending.length == 8


@torch.no_grad()
def test_fast_path_cache_and_graph_are_reused_across_calls():
    model = small_gpu_model()
    inputs = prompt(model, 2)
    greedy(model, inputs, cache_implementation="static")
    runner = model._decode_graphs
    cache, graph = runner.caches[2], runner.graphs[2][0]
    greedy(model, inputs, cache_implementation="static")
    assert runner.caches[2] is cache and runner.graphs[2][0] is graph


@torch.no_grad()
def test_fast_path_stops_at_eos_like_the_plain_path(monkeypatch):
    """generate() reads its stop flag one step late on the fast path (allow_deferred_stop_checks): the extra step it
    decodes after an EOS is undone, so rows that stop early come out as in the plain loop, padding included."""
    from transformers.generation import utils as generation_utils

    model = small_gpu_model()
    inputs = prompt(model, 3)
    free = greedy(model, inputs)
    new = free[:, inputs["input_ids"].shape[1]:]
    eos = int(new[0, 10])  # row 0 stops at its 11th new token at the latest
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=0)
    reference = model.generate(**inputs, **options)
    used = []
    init = generation_utils.DeferredStopCheck.__init__

    def spy(self, *args, **kwargs):
        used.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(generation_utils.DeferredStopCheck, "__init__", spy)
    fast = model.generate(**inputs, **options, cache_implementation="static")
    assert used, "the fast path did not defer its stop check"
    assert torch.equal(fast, reference)
    assert (reference[0, inputs["input_ids"].shape[1]:] == eos).any()


@torch.no_grad()
def test_bfloat16_state_fast_path_steps_like_a_float32_state_rounded_to_bfloat16():
    """config.ssm_state_dtype="bfloat16" (the original code's state dtype) on the GPU, through the captured and
    compiled step with mamba_ssm's kernel. Reference, for each of 16 tokens: transformers' eager step from the fast
    path's current states held in float32, its new SSM state rounded to bf16. Logits agree, and the states agree to
    one bf16 rounding step (the two paths' float32 values differ in the last bits before rounding, which can round
    the other way; over many tokens such flips are why the paths are compared step by step, not end to end)."""
    from modeling_mlmamba.generation_mlmamba import DecodeGraphRunner
    from modeling_mlmamba.modeling_mlmamba import MLMambaCausalLMOutput

    model = small_gpu_model()
    inputs = prompt(model, 2)
    reference_cache = DecodeGraphRunner(model, MLMambaCausalLMOutput, compile_mode=None).cache_for(2)
    model.config.ssm_state_dtype = "bfloat16"
    greedy(model, inputs, cache_implementation="static")  # captures the batch-2 step over a bf16 state
    runner = model._decode_graphs
    cache = runner.cache_for(2)
    assert cache.layers[0].recurrent_states[0].dtype == torch.bfloat16
    next_ids = model(**inputs, cache_params=cache, use_cache=True).logits[:, -1:].argmax(-1)
    model(**inputs, cache_params=reference_cache, use_cache=True)
    for step in range(16):
        for mine, theirs in zip(cache.layers, reference_cache.layers):
            theirs.conv_states[0].copy_(mine.conv_states[0])
            theirs.recurrent_states[0].copy_(mine.recurrent_states[0].float())
        reference = model(input_ids=next_ids, cache_params=reference_cache, use_cache=True).logits.float()
        fast = runner(input_ids=next_ids, cache_params=cache).logits
        torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4, msg=f"logits differ at step {step}")
        for layer, (mine, theirs) in enumerate(zip(cache.layers, reference_cache.layers)):
            torch.testing.assert_close(mine.recurrent_states[0].float(), theirs.recurrent_states[0].bfloat16().float(),
                                       atol=1e-6, rtol=2**-7, msg=f"SSM state, layer {layer}, step {step}")
        next_ids = reference.argmax(-1)


@torch.no_grad()
def test_prefill_replayed_from_a_graph_equals_the_eager_prefill(monkeypatch):
    """Without the chunk ladder (the default; MLMAMBA_PREFILL_CHUNK=0 here) a prompt shape seen twice is prefilled from CUDA graphs
    (towers + connector, then the LM into the cache): the logits and the states it leaves equal the eager prefill's
    (the first sighting), for a batch of 2."""
    monkeypatch.setenv("MLMAMBA_PREFILL_CHUNK", "0")
    model = small_gpu_model()
    inputs = prompt(model, 2)
    runner = model._decode_graph_runner()
    results = []
    for _ in range(3):  # eager, captured at the second sighting (then replayed), replayed
        cache = runner.cache_for(2)
        logits = model(**inputs, cache_params=cache, use_cache=True, logits_to_keep=1).logits
        states = [(layer.conv_states[0].clone(), layer.recurrent_states[0].clone()) for layer in cache.layers]
        assert all(layer.has_previous_state[0] for layer in cache.layers)
        results.append((logits, states))
    assert len(runner.prefill_graphs.graphs) == 1 and len(runner.image_graphs.graphs) == 1
    assert not runner.chunk_graphs.graphs and not runner.chunk_limits
    eager_logits, eager_states = results[0]
    for logits, states in results[1:]:
        torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
        for (conv, ssm), (conv_ref, ssm_ref) in zip(states, eager_states):
            torch.testing.assert_close(conv, conv_ref, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(ssm, ssm_ref, atol=1e-5, rtol=1e-5)
    # a decode step after a replayed prefill continues like the eager path
    reference = greedy(model, inputs)
    for _ in range(2):
        assert torch.equal(greedy(model, inputs, cache_implementation="static"), reference)


def _relative_error(mine: torch.Tensor, reference: torch.Tensor) -> float:
    return float((mine.float() - reference.float()).norm() / reference.float().norm())


@torch.no_grad()
def test_prefill_from_the_chunk_ladder_equals_the_plain_prefill(monkeypatch):
    """With MLMAMBA_PREFILL_CHUNK=512, with a batch size's cache the fast path captures the LM's prefill for chunks of 1, 2, ... 512 tokens (2 rows);
    prompts of lengths never seen before are prefilled as replays of those chunks, each continuing the cache. The
    logits and the states left in the cache agree with transformers' prefill of the whole prompt (plain path, fresh
    cache) to the chunked scan's TF32 products (mamba_ssm multiplies float32 in TF32: measured ~1e-3 elementwise), no
    prompt shape gets a graph of its own, and greedy decoding after it equals the plain path's."""
    monkeypatch.setenv("MLMAMBA_PREFILL_CHUNK", "512")
    model = small_gpu_model()
    runner = model._decode_graph_runner()
    runner.cache_for(2)
    assert runner.chunk_limits == {2: 512}
    assert sorted(key[0][0][1] for key in runner.chunk_graphs.graphs) == [1 << b for b in range(10)]
    config = model.config
    generator = torch.Generator().manual_seed(11)
    pixel_values = torch.randn(2, 6, config.image_size, config.image_size, generator=generator).cuda()
    for text_tokens in (12, 45, 12, 200):  # 76, 109, 76 and 264 tokens: 64 + 8 + 4, 64 + 32 + 8 + 4 + 1, ...
        text = torch.randint(1, 500, (2, text_tokens), generator=generator)
        image = torch.full((2, config.num_image_tokens), config.image_token_id)
        inputs = dict(input_ids=torch.cat([image, text], dim=1).cuda(), pixel_values=pixel_values)
        cache = runner.cache_for(2)
        logits = model(**inputs, cache_params=cache, use_cache=True).logits
        assert all(layer.has_previous_state[0] for layer in cache.layers)
        plain = model(**inputs, use_cache=True)
        assert _relative_error(logits, plain.logits) < 2e-3
        for index, (mine, theirs) in enumerate(zip(cache.layers, plain.cache_params.layers)):
            assert _relative_error(mine.conv_states[0], theirs.conv_states[0]) < 2e-3, f"conv state, layer {index}"
            assert _relative_error(mine.recurrent_states[0], theirs.recurrent_states[0]) < 2e-3, f"layer {index}"
        assert torch.equal(greedy(model, inputs, cache_implementation="static"), greedy(model, inputs))
    assert not runner.prefill_graphs.graphs  # every prompt took the ladder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_fused_norms_compute_what_transformers_norms_compute(dtype):
    """mamba_ssm's one-pass RMSNorm in place of transformers' modules (`fused_norms`: the fast path's prefill and final
    norm): each norm within one rounding of the output dtype (it rounds once where the modules round twice), and a
    prefill's hidden states and SSM states as transformers' (to the chunked scan's TF32 or bf16 roundings)."""
    from modeling_mlmamba.generation_mlmamba import fused_norms, norm_kernel

    if norm_kernel() is None:
        pytest.skip("mamba_ssm is not installed")
    model = small_gpu_model(dtype)
    lm = model.model.language_model
    generator = torch.Generator(device="cuda").manual_seed(5)
    gated = lm.layers[1].mixer.norm
    x, z = torch.randn(2, 7, 2, gated.weight.shape[0], device="cuda", generator=generator).to(dtype).unbind(2)
    gated.weight.data = torch.rand(gated.weight.shape, device="cuda", generator=generator).to(dtype) + 0.5
    block = lm.layers[1].norm
    h = torch.randn(2, 7, block.weight.shape[0], device="cuda", generator=generator).to(dtype)
    final = torch.randn(2, 7, block.weight.shape[0], device="cuda", generator=generator)  # float32, as the residual
    ids = torch.randint(1, 500, (2, 70), device="cuda", generator=generator)
    references = [gated(x, z), block(h), lm.norm_f(final)]
    reference_cache = model._decode_graph_runner().cache_for(2)
    reference = lm(input_ids=ids, cache_params=reference_cache, use_cache=True).last_hidden_state
    reference_states = [layer.recurrent_states[0].clone() for layer in reference_cache.layers]
    with fused_norms(lm) as switched:
        assert switched
        outputs = [gated(x, z), block(h), lm.norm_f(final)]
        cache = model._decode_graph_runner().cache_for(2)
        fused = lm(input_ids=ids, cache_params=cache, use_cache=True).last_hidden_state
    for out, ref in zip(outputs, references):
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6 if out.dtype == torch.float32 else 2**-7)
    # mamba_ssm's chunked scan multiplies in TF32 in a float32 model (10-bit mantissas): a rounding-sized change of
    # its input moves its output by up to ~1e-3, so the prefill is compared in norm (a wrong norm is off by ~1)
    tolerance = 2e-3 if dtype == torch.float32 else 2e-2

    def relative(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    assert relative(fused, reference) <= tolerance
    for layer, ref in zip(cache.layers, reference_states):
        assert relative(layer.recurrent_states[0], ref) <= tolerance


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k,bias", [(10576, 2560, False), (2560, 5120, False), (1000, 300, True), (37, 1030, True)])
def test_triton_gemv_matches_a_float64_product(dtype, n, k, bias):
    """The decode step's batch-1 matrix-vector kernel (released in_proj / out_proj shapes, and sizes that are not
    multiples of its blocks) against the product in float64, within the output dtype's rounding."""
    from modeling_mlmamba.generation_mlmamba import decode_gemv

    gemv = decode_gemv()
    if gemv is None:
        pytest.skip("no Triton here")
    generator = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(1, 1, k, device="cuda", dtype=dtype, generator=generator)
    weight = torch.randn(n, k, device="cuda", dtype=dtype, generator=generator) / k**0.5
    b = torch.randn(n, device="cuda", dtype=dtype, generator=generator) if bias else None
    reference = x.double() @ weight.double().T + (b.double() if bias else 0)
    out = gemv(x, weight, b)
    assert out.shape == (1, 1, n) and out.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), reference, atol=4 * eps * float(reference.abs().max()), rtol=2 * eps)


@torch.no_grad()
def test_cobra_style_model_generates_with_a_static_cache_request():
    """A Mamba-1 LM (Cobra-style) has no fast path: with `cache_implementation="static"` it decodes through
    transformers' path, as with the default cache (it used to fail in the fast path's weight check)."""
    vision = [
        dict(model_type="dinov2_with_registers", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_register_tokens=4, patch_size=14, image_size=112, mlp_ratio=2),
        dict(model_type="siglip_vision_model", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=2, patch_size=14, image_size=112),
    ]
    text = dict(model_type="mamba", vocab_size=512, hidden_size=128, num_hidden_layers=2, state_size=16, expand=2,
                conv_kernel=4, tie_word_embeddings=True, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    config = MLMambaConfig(vision_config=vision, text_config=text, image_token_id=511, connector_type="mlp")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MLMambaForConditionalGeneration(config).eval()
    assert model._decode_graph_runner() is None
    inputs = prompt(model, 1)
    assert torch.equal(greedy(model, inputs, cache_implementation="static"), greedy(model, inputs))
