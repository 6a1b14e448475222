"""Fast decoding on a GPU: the decode step of the Mamba-2 LM replayed as one CUDA graph.

Why: a decode step of Mamba-2 2.7B reads ~5.4 GB of weights (≈1.8 ms at 3 TB/s), but in eager mode it launches
~25 small kernels per layer × 64 layers, and the launches, not the bytes, set the pace (tens of ms per token).
The step is therefore (1) compiled with `torch.compile` (inductor fuses the norms, gates, casts and residual adds
between the two large matrix-vector products of each layer), and (2) captured once per batch size in a
`torch.cuda.CUDAGraph` over preallocated conv / SSM states, then replayed: one launch per token.

How it plugs into transformers' `generate()` (no loop of our own):
  - `cache_implementation="static"` asks `generate()` for a compileable cache. Our model answers with a
    `StaticCache` whose layers are transformers' `LinearAttentionLayer`s (conv + SSM state, fixed size), allocated
    once per batch size and reused (reset) across calls, so the graph captured over its tensors stays valid.
  - Because that cache is compileable, `generate()` runs every decode step through `model.get_compiled_call()`;
    our model returns a `DecodeGraphRunner` there, which replays the captured graph for single-token steps and
    falls back to the plain forward for anything else.
Prefill is not captured: it runs eagerly through the same kernels as the rest of the model (mamba_ssm's chunked
scan and causal_conv1d when installed: linear memory in the sequence length).

Nothing here runs on CPU: without CUDA, `generate()` takes transformers' ordinary path.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticCache
from transformers.utils import logging


logger = logging.get_logger(__name__)


class DecodeGraphRunner:
    """Captures and replays the single-token decode step of an `MLMambaForConditionalGeneration` on CUDA.

    One graph per batch size; all graphs share one memory pool. `compile_mode` is passed to `torch.compile`
    for the step that is captured ("default", "max-autotune-no-cudagraphs"), or None for no compilation
    (the eager kernels are captured as they are: slower, but no compile time).
    """

    def __init__(self, model, output_class, compile_mode: str | None = "default"):
        self.model = model
        self.output_class = output_class
        self.compile_mode = compile_mode
        self.caches: dict[int, StaticCache] = {}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, StaticCache]] = {}
        self.pool = None
        self._step = None

    def set_compile_mode(self, compile_mode: str | None) -> None:
        if compile_mode != self.compile_mode:
            self.compile_mode, self._step, self.graphs = compile_mode, None, {}

    # ---- the step that is captured ------------------------------------------------------------------------------
    def _eager_step(self, input_ids: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """input_ids: (batch, 1) → float32 logits (batch, 1, vocab); updates `cache` in place.

        The text-only decode step of `MLMambaForConditionalGeneration.forward` (no image tokens can occur here:
        generated ids come from the LM's own vocabulary)."""
        model = self.model
        hidden = model.model.language_model(input_ids=input_ids, cache_params=cache, use_cache=True).last_hidden_state
        return model.lm_head(hidden.to(model.lm_head.weight.dtype)).float()

    def step_fn(self):
        if self._step is None:
            self._step = (
                self._eager_step
                if self.compile_mode is None
                else torch.compile(self._eager_step, mode=self.compile_mode, fullgraph=False)
            )
        return self._step

    # ---- the cache --------------------------------------------------------------------------------------------
    def cache_for(self, batch_size: int) -> StaticCache:
        """The cache for `batch_size` rows: allocated on first use, then reset and reused, so that its conv / SSM
        states keep the addresses the captured graph replays against."""
        cache = self.caches.get(batch_size)
        if cache is None:
            cache = self._allocate(batch_size)
            self.caches[batch_size] = cache
        cache.reset()  # zeroes the states in place and marks them empty: the next forward is a prefill
        return cache

    def _allocate(self, batch_size: int) -> StaticCache:
        text_config = self.model.config.text_config
        cache = StaticCache(config=text_config, max_cache_len=1)  # linear-attention layers ignore the length
        device, dtype = self.model.device, self.model.lm_head.weight.dtype
        num_heads, head_dim, state = text_config.num_heads, text_config.head_dim, text_config.state_size
        conv_dim = int(text_config.expand * text_config.hidden_size) + 2 * text_config.n_groups * state
        for layer in cache.layers:
            # conv state in the activations' dtype, SSM state in float32 (what the chunked scan hands over)
            layer.lazy_initialization(
                conv_states=torch.zeros(batch_size, conv_dim, text_config.conv_kernel, device=device, dtype=dtype),
                recurrent_states=torch.zeros(
                    batch_size, num_heads, head_dim, state, device=device, dtype=torch.float32
                ),
            )
        return cache

    @torch.no_grad()
    def _capture(self, batch_size: int, cache: StaticCache) -> None:
        """Compile (on first use), warm up and capture the decode step over `cache`, whose states hold a live
        prefill: they are saved before and put back after, since warm-up and capture run the step."""
        saved = [(layer.conv_states[0].clone(), layer.recurrent_states[0].clone()) for layer in cache.layers]
        try:
            self._warm_up_and_capture(batch_size, cache)
        except Exception as error:  # a kernel that torch.compile cannot take: capture the eager kernels instead
            if self.compile_mode is None:
                raise
            logger.warning(f"Compiling the decode step failed ({type(error).__name__}: {error}); capturing it eagerly")
            self.set_compile_mode(None)
            self._warm_up_and_capture(batch_size, cache)
        finally:
            for layer, (conv, ssm) in zip(cache.layers, saved):
                layer.conv_states[0].copy_(conv)
                layer.recurrent_states[0].copy_(ssm)

    def _warm_up_and_capture(self, batch_size: int, cache: StaticCache) -> None:
        static_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=self.model.device)
        step = self.step_fn()
        # Warm up on a side stream: compilation, autotuning and lazy cuBLAS / Triton initialisation happen here,
        # outside the capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step(static_ids, cache)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_logits = step(static_ids, cache)
        self.graphs[batch_size] = (graph, static_ids, static_logits, cache)

    # ---- what generate() calls for every decode step ------------------------------------------------------------
    def __call__(self, **model_inputs):
        input_ids = model_inputs.get("input_ids")
        cache = model_inputs.get("cache_params")
        replayable = (
            input_ids is not None
            and input_ids.shape[1] == 1
            and cache is not None
            and self.caches.get(input_ids.shape[0]) is cache
            and cache.layers[0].has_previous_state[0]
            and model_inputs.get("inputs_embeds") is None
            and model_inputs.get("pixel_values") is None
            and not model_inputs.get("output_hidden_states")
        )
        if not replayable:
            return self.model(**model_inputs)
        batch_size = input_ids.shape[0]
        if batch_size not in self.graphs:
            self._capture(batch_size, cache)
        graph, static_ids, static_logits, _ = self.graphs[batch_size]
        static_ids.copy_(input_ids)
        graph.replay()
        # generate() copies the last position's logits before the next replay overwrites them
        return self.output_class(logits=static_logits, cache_params=cache)
