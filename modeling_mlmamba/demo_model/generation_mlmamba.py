"""Fast decoding on a GPU: the decode step of the Mamba-2 LM replayed as one CUDA graph.

Why: a decode step of Mamba-2 2.7B reads ~5.4 GB of weights (≈1.9 ms at 2.9 TB/s), but in eager mode it launches
~30 small kernels per layer × 64 layers, and the launches, not the bytes, set the pace (55 ms per token measured on an
H100 with transformers' plain `generate()`). The step is therefore
  (1) written per layer as one function of tensors (`make_block_step`: the arithmetic of transformers'
      `Mamba2Block` on one token) around causal_conv1d's and mamba_ssm's single-token kernels, registered as custom
      ops so that `torch.compile` takes the layer as one graph and fuses the norms, gates and casts in between; one
      compiled graph serves all 64 layers;
      At batch 1, and at 2-16 where TUNED_CONFIGS has their launch configurations (Triton on CUDA), a layer is
      instead three fused Triton kernels (`make_fused_block_step`: the norms folded into the two products, the conv
      update in in_proj's epilogue, the SSM update with the gate), which overlap through programmatic dependent
      launch on Hopper; the fused SSM update writes the state back every K steps only (16 at batch 1, 8 at 2-16),
      keeping the steps in between in small buffers (`DeferredUpdates`), and the cache is settled
      (`DecodeGraphRunner.settle`) before anything else reads it;
  (2) captured once per batch size in a `torch.cuda.CUDAGraph` over preallocated conv / SSM states, then replayed:
      one launch per token;
  (3) not waited for: `generate()` normally reads its stop flag on the host after every token; for these caches it
      reads it one step late (`allow_deferred_stop_checks`), so that the loop's host work overlaps the GPU's.

How it plugs into transformers' `generate()` (no loop of our own):
  - `cache_implementation="static"` asks `generate()` for a compileable cache. Our model answers with a
    `StaticCache` whose layers are transformers' `LinearAttentionLayer`s (conv + SSM state, fixed size), allocated
    once per batch size and reused (reset) across calls, so the graph captured over its tensors stays valid.
  - Because that cache is compileable, `generate()` runs every decode step through `model.get_compiled_call()`;
    our model returns a `DecodeGraphRunner` there, which replays the captured graph for single-token steps and
    falls back to the plain forward for anything else.
Prefill runs through the same kernels as the rest of the model (mamba_ssm's chunked scan and causal_conv1d when
installed: linear memory in the sequence length). Eagerly it is host-bound, so it is replayed from CUDA graphs
(`ShapeGraphs`): the towers + connector, and the LM's prefill into the cache, once their input shape was seen twice
(its first sight runs eagerly). With MLMAMBA_PREFILL_CHUNK=512 (off by default: see `prefill_chunk_limit`), the LM's
prefill is instead captured, when a batch size's cache is allocated, for chunks of 1, 2, 4, ... 512 tokens, each
continuing the cache's states as transformers' Mamba-2 continues a cache (chunked prefill), and every prompt, its
first time included, is a few of those replays (`prefill_chunks`).

`config.ssm_state_dtype` sets the dtype of the decode state: by default ("auto") the LM's, as the original code and
mamba_ssm keep it (bf16 for a bf16 model); "float32" to decode token for token like transformers' plain path.

Nothing here runs on CPU by default: without CUDA, `generate()` takes transformers' ordinary path (the step function
itself runs anywhere and is tested on CPU against transformers' Mamba-2).
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers.utils import logging

from . import transformers_compat as hf
from .transformers_compat import StaticCache


logger = logging.get_logger(__name__)


# ---- the kernels of one decode step ---------------------------------------------------------------------------------
# causal_conv1d's and mamba_ssm's single-token kernels when they are installed (the ones transformers' Mamba-2 uses
# eagerly), wrapped as opaque custom ops so that torch.compile takes a whole layer as one graph around them and fuses
# the norms, gates and casts in between; transformers' own torch reference functions otherwise (compiled as they are).
_KERNELS: tuple | None = None


def _torch_conv_update(x, conv_state, weight, bias, activation):
    return hf.causal_conv1d_update(x, conv_state, weight, bias, activation=activation)


def _per_head(state, x, dt, A, D, dt_bias) -> dict:
    """dt (batch, heads) and A, D, dt_bias (heads,) broadcast over head_dim (A also over the state) as zero-stride
    views: the layout mamba_ssm's selective_state_update reads (and transformers' Mamba-2 passes)."""
    head_dim, state_size = x.shape[-1], state.shape[-1]
    return dict(
        dt=dt[..., None].expand(-1, -1, head_dim), A=A[:, None, None].expand(-1, head_dim, state_size),
        D=D[:, None].expand(-1, head_dim), dt_bias=dt_bias[:, None].expand(-1, head_dim),
    )


def _torch_state_update(state, x, dt, A, B, C, D, dt_bias):
    """One token of the SSM recurrence (softplus on dt, no gate); dt: (batch, heads), A, D, dt_bias: (heads,)."""
    return hf.mamba2_selective_state_update(
        state, x, B=B, C=C, z=None, dt_softplus=True, **_per_head(state, x, dt, A, D, dt_bias)
    )


def decode_kernels() -> tuple:
    """(conv_update, state_update, names) for the decode step; the custom ops are registered on first use (once per
    process, also when a remote-code copy of this file is imported beside the package)."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    conv_update, state_update, names = _torch_conv_update, _torch_state_update, ["torch", "torch"]
    try:
        from causal_conv1d import causal_conv1d_update as conv_kernel
    except Exception:  # not installed, or built for another torch
        conv_kernel = None
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as state_kernel
    except Exception:
        state_kernel = None
    ops = register_kernel_ops(conv_kernel, state_kernel)
    if conv_kernel is not None:
        conv_update, names[0] = ops.conv_state_update, "causal_conv1d"
    if state_kernel is not None:
        state_update, names[1] = ops.ssm_state_update, "mamba_ssm"
    _KERNELS = (conv_update, state_update, tuple(names))
    return _KERNELS


def register_kernel_ops(conv_kernel, state_kernel, namespace: str = "mlmamba"):
    """Registers `{namespace}::conv_state_update` (around causal_conv1d_update's signature) and
    `{namespace}::ssm_state_update` (around mamba_ssm's selective_state_update, softplus on dt, no gate, per-head
    arguments unexpanded: dt (batch, heads), A, D, dt_bias (heads,)) as custom ops that mutate their state argument,
    each once per process; a kernel given as None is skipped."""
    ops = getattr(torch.ops, namespace)
    if conv_kernel is not None and not hasattr(ops, "conv_state_update"):

        @torch.library.custom_op(f"{namespace}::conv_state_update", mutates_args=("conv_state",))
        def conv_state_update(
            x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            activation: str,
        ) -> torch.Tensor:
            return conv_kernel(x, conv_state, weight, bias, activation=activation)

        @conv_state_update.register_fake
        def _(x, conv_state, weight, bias, activation):
            return torch.empty_like(x)

    if state_kernel is not None and not hasattr(ops, "ssm_state_update"):

        @torch.library.custom_op(f"{namespace}::ssm_state_update", mutates_args=("state",))
        def ssm_state_update(
            state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
            C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
        ) -> torch.Tensor:
            # the per-head arguments are broadcast here, inside the op: passed expanded, torch.compile would
            # materialise A as a (heads, head_dim, state) copy in front of the op every step
            return state_kernel(state, x, B=B, C=C, z=None, dt_softplus=True, **_per_head(state, x, dt, A, D, dt_bias))

        @ssm_state_update.register_fake
        def _(state, x, dt, A, B, C, D, dt_bias):
            return torch.empty_like(x)

    return ops


# ---- the norms of a prefill: one kernel each instead of ~8 -----------------------------------------------------------
# transformers' `Mamba2RMSNorm` and `MambaRMSNormGated` are written as torch ops (casts, pow, mean, rsqrt, two
# products, the gate's silu): ~8 elementwise kernels per norm, each a pass over the activations in float32. Over an
# 800-token prompt of the released model at batch 8, elementwise kernels were ~90 ms of the prefill's 184 ms of GPU
# time, most of them the norms' (benchmarks/profile_decode.py on an H100). mamba_ssm's one-pass Triton RMSNorm (the kernel of mamba_ssm's own `RMSNormGated`, which the
# original ML-Mamba code runs) computes the same in one pass; `fused_norms` switches the LM's norms to it where it
# applies. It rounds once, at the end (transformers' modules round the normalised value to the input dtype before the
# weight multiplies it): equal in float32 up to summation order, within one bf16 rounding step in bf16.
_NORM_KERNEL: list = []  # [mamba_ssm's rmsnorm_fn or None], resolved on first use


def norm_kernel():
    """mamba_ssm's `rmsnorm_fn` (Triton; gated or plain, grouped), or None where mamba_ssm is not importable."""
    if not _NORM_KERNEL:
        try:
            from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        except Exception:  # not installed, or built for another torch
            rmsnorm_fn = None
        _NORM_KERNEL.append(rmsnorm_fn)
    return _NORM_KERNEL[0]


def _fused_norm_forward(module, kernel, device_types):
    """A `forward` for `module` (a `Mamba2RMSNorm` or `MambaRMSNormGated`) through `kernel` (`rmsnorm_fn`'s signature)
    where the kernel computes what the module computes (a device of `device_types`, no gradient, the output in the
    input's dtype, the gate of the input's shape); the module's own forward otherwise."""
    original = type(module).forward
    gated = isinstance(module, hf.MambaGatedRMSNorm)

    def forward(hidden_states, gate=None):
        weight = module.weight
        if (
            hidden_states.device.type in device_types
            and not (torch.is_grad_enabled() and (hidden_states.requires_grad or weight.requires_grad))
            and torch.promote_types(weight.dtype, hidden_states.dtype) == hidden_states.dtype
            and hidden_states.shape[-1] == weight.shape[0]
            and (gate is None or gate.shape == hidden_states.shape)
        ):
            return kernel(hidden_states, weight, None, z=gate, eps=module.variance_epsilon,
                          group_size=getattr(module, "group_size", None) if gated else None,
                          norm_before_gate=False)
        return original(module, hidden_states, gate) if gated else original(module, hidden_states)

    return forward


@contextlib.contextmanager
def fused_norms(language_model, kernel=None, device_types: tuple[str, ...] = ("cuda",), norms=None):
    """Within: the RMSNorms of `language_model` (a transformers `Mamba2Model`: each block's norm, each mixer's gated
    norm, the final norm; or only the modules in `norms`) run through `kernel` (default: mamba_ssm's `rmsnorm_fn`, on
    CUDA tensors; nothing changes without it). Only modules of exactly transformers' classes without a forward of
    their own (e.g. accelerate's hooks) are switched; their forward is restored on exit. Yields whether any module
    was switched."""
    kernel = kernel if kernel is not None else norm_kernel()
    switched = []
    if kernel is not None:
        if norms is None:
            norms = [language_model.norm_f] + [
                m for layer in language_model.layers for m in (layer.norm, layer.mixer.norm)]
        for module in norms:
            if type(module) in (hf.Mamba2RMSNorm, hf.MambaGatedRMSNorm) and (
                "forward" not in module.__dict__
            ):
                module.forward = _fused_norm_forward(module, kernel, device_types)
                switched.append(module)
    try:
        yield bool(switched)
    finally:
        for module in switched:
            del module.forward


# ---- batch-1 matrix-vector products ------------------------------------------------------------------------------
# At batch 1 the step is two matrix-vector products per layer (in_proj: 54 MB of weights, out_proj: 26 MB for the
# released model), and their speed is the step's speed. cuBLAS reaches ~2.46 TB/s on in_proj and splits out_proj
# over K (a second, reduction kernel). This Triton kernel streams each weight row block once, accumulating in float32
# (what cuBLAS does for bf16), one program per block of output rows. Used when `decode_gemv()` finds Triton on CUDA.
_GEMV: list = []  # [op or None], resolved on first use


def _gemv_kernel():
    import triton
    import triton.language as tl

    configs = [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
        for n, k, w, st in [
            (4, 512, 4, 4), (8, 256, 4, 4), (8, 512, 4, 3), (8, 512, 8, 3), (16, 256, 4, 4), (16, 256, 8, 4),
            (16, 512, 8, 3), (32, 128, 4, 4), (32, 256, 8, 3), (4, 1024, 4, 3), (8, 1024, 8, 2),
        ]
    ]

    @triton.autotune(configs=configs, key=["N", "K"])
    @triton.jit
    def gemv(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < K
            x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                        other=0.0, eviction_policy="evict_first").to(tl.float32)
            acc += w * x[None, :]
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_mask)

    return triton, gemv


def decode_gemv(namespace: str = "mlmamba"):
    """`{namespace}::gemv(x, weight, bias)`: `F.linear` for one input row (x: (..., K) with one row in all), as a
    custom op around the Triton kernel above; None without Triton or CUDA, or when MLMAMBA_TRITON_GEMV=0."""
    if _GEMV:
        return _GEMV[0]
    op = None
    if os.environ.get("MLMAMBA_TRITON_GEMV", "1") != "0" and torch.cuda.is_available():
        try:
            triton, kernel = _gemv_kernel()
        except Exception:  # no Triton, or one that cannot build this kernel
            kernel = None
        if kernel is not None:
            ops = getattr(torch.ops, namespace)
            if not hasattr(ops, "gemv"):

                @torch.library.custom_op(f"{namespace}::gemv", mutates_args=())
                def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
                    n, k = weight.shape
                    if x.numel() != k or weight.stride(1) != 1:  # not one row, or a weight view it cannot stream
                        return F.linear(x, weight, bias)
                    out = x.new_empty(*x.shape[:-1], n)
                    with torch.cuda.device(x.device):  # Triton launches on the current device
                        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
                            x.contiguous(), weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
                            HAS_BIAS=bias is not None,
                        )
                    return out

                @gemv.register_fake
                def _(x, weight, bias):
                    return x.new_empty(*x.shape[:-1], weight.shape[0])

            op = ops.gemv
    _GEMV.append(op)
    return op


# ---- one layer in three kernels ------------------------------------------------------------------------------------
# At batch 1 the compiled step still runs ~7 kernels per layer (add + RMSNorm, in_proj, conv update, A = -exp(A_log),
# SSM update, gated RMSNorm, out_proj): ~13 µs per layer besides the two matrix-vector products, and each kernel
# boundary inside the CUDA graph costs another ~1 µs. Here a layer is three Triton kernels:
#   1. `norm_in_proj_conv`: residual add + RMSNorm folded into in_proj's matrix-vector product, the conv update of
#      the xBC channels as its epilogue (each channel belongs to one program: its conv state is shifted there);
#   2. `ssm_step_gate`: the SSM state update (softplus(dt + dt_bias), A = -exp(A_log)), D skip, the gate y·silu(z),
#      the gated norm's weight, and per-block sums of squares of the gated output for the next kernel's norm;
#   3. `gated_norm_out_proj`: the gated RMSNorm's scale (per group, from those sums) folded into out_proj's product
#      (split over K when faster, the partial sums added in a fixed order by the last program of a row block).
# An RMSNorm's scale r is one number per row (per group): W (w ∘ x · r) = r · W (w ∘ x), so both products run on the
# unscaled input while its mean square is summed in the same pass, and multiply by r at the end; the norms cost no
# pass and no kernel of their own. Each kernel reads its first weight tile (the SSM kernel: its state) before waiting
# for the previous kernel (`griddepcontrol.wait`) and, on Hopper, is launched with programmatic dependent launch, so
# consecutive kernels overlap. The arithmetic is `make_block_step`'s (transformers' Mamba2Block on one token); in
# bfloat16 the roundings differ (in_proj's normalised input is not rounded before the product, the gated output is
# rounded once after its norm weight), in float32 only the order of the sums does.
# `norm_in_proj_conv_rows` / `gated_norm_out_proj_rows` are the products for 2-16 sequences (tensor-core tiles of 16
# rows with the weight tile as the wide operand, each weight tile read once for all rows, the tiles in flight through
# Triton's software pipelining); `ssm_step_gate` takes any batch. For 2-16 sequences the layers are also chained:
# given the next layer's norm weight, out_proj's epilogue forms the next block's input (the residual add, the norm
# weight, per-row-block sums of squares: `ChainedInput`), so that the next in_proj streams only its weights and that
# input (recomputing the add and the statistics in every program cost in_proj ~15% at batch 8), and 16-bit conv states
# are updated as one 64-bit word per channel. They run by default where TUNED_CONFIGS has their
# launch configurations (measured faster than the compiled layer there), elsewhere on request
# (MLMAMBA_FUSED_DECODE_MAX_BATCH).
_FUSED: list = []  # [(triton, kernels) or None], resolved on first use
_SSM_BLOCK_P = 16  # head-dim rows per program of the SSM update (sets how its sums of squares are laid out)
# warps per program of the SSM update at batch 1 / at 2-16. At 2-16 rows, with the deferred writes' buffered steps
# read after the wait (DEFER_LATE_ROWS), the bf16-state kernel takes 127 registers per thread on 1 warp, 80 on 2: by
# registers up to 16 programs per SM hold their state tile while in_proj runs, against 12 (8 with only B read late:
# 116 registers).
# Measured on an H100 at batch 8, ms per step: bf16 state 3.126 on 1 warp against 3.263 on 2 (3.243 with only B
# read late), float32 3.361 against 3.452 (docs/benchmarks.md)
SSM_WARPS, SSM_WARPS_ROWS = 2, 1
FUSED_MAX_ROWS = 16  # the fused layer's largest batch: one 16-row tile of the products


def _fused_kernels(autotune: bool = True):
    import triton
    import triton.language as tl

    @triton.jit
    def _matvec_tile(w_ptr, rows, cols, row_mask, k_end, stride_wn):
        # a (rows × columns) tile of the weight, columns from k_end on read as zeros; read once, not kept in L2
        return tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :],
                       mask=row_mask[:, None] & (cols < k_end)[None, :], other=0.0, eviction_policy="evict_first")

    @triton.jit
    def _rows_dot(x, w, acc, IEEE: tl.constexpr):
        # acc + (x @ w^T)^T: the weight tile (weight rows × columns) as the tensor cores' wide operand, the batch's
        # 16 rows as the narrow one (1.5x faster than x @ w^T at the released shapes on an H100)
        if IEEE:
            return tl.dot(w, tl.trans(x), acc, input_precision="ieee")
        else:
            return tl.dot(w, tl.trans(x), acc)

    @triton.jit
    def _out_proj_total(out, offsets, mask, rows, row_mask, b_ptr, split_ptr, split_stride, count_ptr, pid_n, pid_k,
                        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
        # out_proj's result (`offsets` into the output, the bias indexed by weight row) and whether this program holds
        # it. Split over K: each program leaves its partial sums; the last of a row block's programs to finish adds
        # them up, in split order (so the result does not depend on which finished last) and resets the block's
        # counter; the others hold nothing (their loads are masked off)
        last = pid_k == 0
        if SPLIT_K > 1:
            tl.store(split_ptr + pid_k * split_stride + offsets, out, mask=mask)
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
            last = done == SPLIT_K - 1
            out = tl.zeros_like(out)
            for split in tl.static_range(SPLIT_K):
                out += tl.load(split_ptr + split * split_stride + offsets, mask=mask & last, other=0.0,
                               cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + pid_n, 0, mask=last)
        if HAS_BIAS:
            out += tl.load(b_ptr + rows, mask=row_mask & last, other=0.0).to(tl.float32)
        return out, last

    @triton.jit
    def _wait_for_previous(USE_PDL: tl.constexpr, LAUNCH_EARLY: tl.constexpr):
        # programmatic dependent launch: wait for the previous kernel's results (what came before needs none), and
        # let the next kernel launch: once this one's programs have all passed here, or (LAUNCH_EARLY) once they
        # have all started, so that it reads its own weights while this one works. Its wait still waits for this
        # kernel to finish, which finished after the one before it.
        if USE_PDL:
            if LAUNCH_EARLY:
                tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
            if not LAUNCH_EARLY:
                tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _trace(trace_ptr, slot, trace_stride, POINT: tl.constexpr, TRACE: tl.constexpr):
        # benchmarks/experiments.py --part timeline: this program's %globaltimer at POINT (0: start, 1: inputs
        # ready, 2: done) and, at the start, the SM it runs on, into trace_ptr[slot, program, 0:4]
        if TRACE:
            program = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
            base = trace_ptr + (slot * trace_stride + program) * 4 + tl.arange(0, 1)
            zero = tl.zeros([1], dtype=tl.int32)
            now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [zero], dtype=tl.int64,
                                            is_pure=False, pack=1)
            tl.store(base + POINT, now)
            if POINT == 0:
                sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [zero], dtype=tl.int32, is_pure=False,
                                               pack=1)
                tl.store(base + 3, sm.to(tl.int64))

    @triton.jit
    def _add_buffered_steps(h, weights, j, pend_x, pend_b, channel, p_mask, cols, c_mask, stride_px_k, stride_pb_k,
                            DEFER: tl.constexpr):
        # the deferred write-back (ssm_step_gate, DEFER): h (channels x the state columns `cols`) plus each buffered
        # step's dt_k x_k B_k^T, decayed to now (`weights`), for the steps in slots 0 .. K - 2
        for k in range(0, DEFER - 1):
            w_k = tl.sum(tl.where(j == k, weights, 0.0), axis=0)
            x_k = tl.load(pend_x + k * stride_px_k + channel, mask=p_mask, other=0.0).to(tl.float32)
            b_k = tl.load(pend_b + k * stride_pb_k + cols, mask=c_mask, other=0.0).to(tl.float32)
            h += (w_k * x_k)[:, None] * b_k[None, :]
        return h

    @triton.jit
    def _buffered_x_dt(pend_x, pend_dt, j, channel, p_mask, head, stride_px_k, stride_pdt_k):
        # the deferred writes' buffered steps (ssm_step_gate, DEFER): x of this program's channels and dt of its head,
        # in all K slots
        xs = tl.load(pend_x + j[:, None] * stride_px_k + channel[None, :], mask=p_mask[None, :],
                     other=0.0).to(tl.float32)
        return xs, tl.load(pend_dt + j * stride_pdt_k + head).to(tl.float32)

    # compiled kernels find these helpers in their closure; Triton's interpreter (CPU tests) runs a kernel's source
    # against the module's globals only, so they are there too
    globals().update(_matvec_tile=_matvec_tile, _rows_dot=_rows_dot, _out_proj_total=_out_proj_total,
                     _wait_for_previous=_wait_for_previous, _trace=_trace, _add_buffered_steps=_add_buffered_steps,
                     _buffered_x_dt=_buffered_x_dt)

    @triton.jit
    def norm_in_proj_conv(
        res_ptr, prev_ptr, norm_w_ptr, res_out_ptr, w_ptr, b_ptr, out_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr,
        N, K, stride_wn, conv_start, conv_dim, stride_cs_c, stride_cs_k, stride_cw_c, stride_cw_k, eps,
        HAS_BIAS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, SILU: tl.constexpr,
        D_CONV: tl.constexpr, BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr = True,
        LAUNCH_EARLY: tl.constexpr = False,
    ):
        pid = tl.program_id(0)
        dtype = norm_w_ptr.dtype.element_ty
        # one pass: the block input h (previous residual + previous mixer output), its mean square, and in_proj on
        # norm_w * h, streaming this program's weight rows once; the RMSNorm's scale r multiplies the product
        # afterwards (W (norm_w * h * r) = r * W (norm_w * h)), so the norm costs no pass of its own
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        # PREFETCH: the weights do not depend on the previous kernel: the first tile is read before waiting for
        # it, and the next tile is in flight while this one is used (else Triton's software pipelining, num_stages)
        if PREFETCH:
            w = _matvec_tile(w_ptr, rows, tl.arange(0, BLOCK_K), row_mask, K, stride_wn)
        _wait_for_previous(USE_PDL, LAUNCH_EARLY)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = cols < K
            if PREFETCH:
                w_next = _matvec_tile(w_ptr, rows, cols + BLOCK_K, row_mask, K, stride_wn)
            else:
                w = _matvec_tile(w_ptr, rows, cols, row_mask, K, stride_wn)
            h = tl.load(res_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            h += tl.load(prev_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            h = h.to(res_out_ptr.dtype.element_ty)  # the residual stream's dtype
            tl.store(res_out_ptr + cols, h, mask=mask & (pid == 0))
            x = h.to(dtype).to(tl.float32)
            squares += x * x
            x = tl.load(norm_w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * x
            acc += w.to(tl.float32) * x[None, :]
            if PREFETCH:
                w = w_next
        acc *= tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        val = tl.sum(acc, axis=1)
        if HAS_BIAS:
            val += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        val = val.to(out_ptr.dtype.element_ty).to(tl.float32)  # the projection's output dtype
        # epilogue: the depthwise causal conv of the xBC channels (state shifted left, the new value last)
        c = rows - conv_start
        is_conv = row_mask & (c >= 0) & (c < conv_dim)
        j = tl.arange(0, BLOCK_C)
        conv_mask = is_conv[:, None] & (j < D_CONV)[None, :]
        shifted = tl.load(conv_state_ptr + c[:, None] * stride_cs_c + (j[None, :] + 1) * stride_cs_k,
                          mask=conv_mask & (j + 1 < D_CONV)[None, :], other=0.0)
        state_dtype = conv_state_ptr.dtype.element_ty
        window = tl.where((j == D_CONV - 1)[None, :], val.to(state_dtype)[:, None], shifted).to(tl.float32)
        tl.store(conv_state_ptr + c[:, None] * stride_cs_c + j[None, :] * stride_cs_k, window.to(state_dtype),
                 mask=conv_mask)
        conv_w = tl.load(conv_w_ptr + c[:, None] * stride_cw_c + j[None, :] * stride_cw_k, mask=conv_mask, other=0.0)
        conv = tl.sum(window * conv_w.to(tl.float32), axis=1)
        if HAS_CONV_BIAS:
            conv += tl.load(conv_b_ptr + c, mask=is_conv, other=0.0).to(tl.float32)
        if SILU:
            conv = conv * tl.sigmoid(conv)
        val = tl.where(is_conv, conv, val)
        tl.store(out_ptr + rows, val.to(out_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def ssm_step_gate(
        proj_ptr, state_ptr, A_log_ptr, D_ptr, dt_bias_ptr, gated_w_ptr, y_ptr, part_ptr,
        stride_proj_b, stride_s_b, stride_s_h, stride_s_p, stride_s_n, stride_y_b, stride_part_b,
        x_start, b_start, c_start, dt_start, heads_per_group, head_dim, state_size,
        HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, USE_PDL: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_S: tl.constexpr,
        LAUNCH_EARLY: tl.constexpr = False,
        trace_ptr=None, trace_slot=0, trace_stride=0, TRACE: tl.constexpr = False,
        pend_x_ptr=None, pend_dt_ptr=None, pend_b_ptr=None, count_ptr=None, stride_px_b=0, stride_px_k=0,
        stride_pdt_b=0, stride_pdt_k=0, stride_pb_b=0, stride_pb_k=0, DEFER: tl.constexpr = 0,
        FOLD_COLS: tl.constexpr = 0, B_LATE: tl.constexpr = 0,
    ):
        # DEFER = K > 0 (`DeferredUpdates`): the state in memory, h0, is the state of up to K - 1 steps ago; the steps
        # since (x, dt, B of each) wait in the pending buffers at slots 0 .. slot - 1, slot = count % K. The output
        # is computed from h0 and the buffered steps (the same recurrence, unrolled: h_t = exp(a_t) h_(t-1) +
        # dt_t x_t B_t^T, a = A dt, so h_t C = exp(a_1 + .. + a_t) h0 C + sum_j exp(a_(j+1) + .. + a_t) dt_j x_j
        # (B_j . C)); h0 is written back only when the buffer is full (slot K - 1): the state is read every step
        # but written every K-th
        _trace(trace_ptr, trace_slot, trace_stride, 0, TRACE)
        pid_p, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < head_dim
        n = tl.arange(0, BLOCK_S)
        n_mask = n < state_size
        proj = proj_ptr + batch * stride_proj_b
        channel = head * head_dim + p
        group = head // heads_per_group
        # the state and the weights do not depend on the previous kernel: read before waiting for it
        state_ptrs = (state_ptr + batch * stride_s_b + head * stride_s_h + p[:, None] * stride_s_p
                      + n[None, :] * stride_s_n)
        mask = p_mask[:, None] & n_mask[None, :]
        state = tl.load(state_ptrs, mask=mask, other=0.0).to(tl.float32)
        A = -tl.exp(tl.load(A_log_ptr + head).to(tl.float32))
        gated_w = tl.load(gated_w_ptr + channel, mask=p_mask, other=0.0).to(tl.float32)
        dt_bias = 0.0
        if HAS_DT_BIAS:
            dt_bias = tl.load(dt_bias_ptr + head).to(tl.float32)
        if DEFER > 0:  # the buffered steps (all K slots; those not yet written this round are masked off below)
            j = tl.arange(0, DEFER)
            pend_x = pend_x_ptr + batch * stride_px_b
            pend_dt = pend_dt_ptr + batch * stride_pdt_b
            pend_b = pend_b_ptr + batch * stride_pb_b + group * state_size
            # B_LATE: 0: all read before the wait; 1: B read after it (see below); 2: x, dt and B read after it,
            # so that the state is all a program holds while it waits (fewer registers: more programs fit early)
            if B_LATE < 2:
                xs, dts = _buffered_x_dt(pend_x, pend_dt, j, channel, p_mask, head, stride_px_k, stride_pdt_k)
            if B_LATE == 0:
                bs = tl.load(pend_b + j[:, None] * stride_pb_k + n[None, :], mask=n_mask[None, :],
                             other=0.0).to(tl.float32)
        _wait_for_previous(USE_PDL, LAUNCH_EARLY)
        _trace(trace_ptr, trace_slot, trace_stride, 1, TRACE)
        x = tl.load(proj + x_start + channel, mask=p_mask, other=0.0).to(tl.float32)
        B = tl.load(proj + b_start + group * state_size + n, mask=n_mask, other=0.0).to(tl.float32)
        C = tl.load(proj + c_start + group * state_size + n, mask=n_mask, other=0.0).to(tl.float32)
        dt = tl.load(proj + dt_start + head).to(tl.float32) + dt_bias
        dt = tl.where(dt <= 20.0, tl.log(tl.exp(dt) + 1.0), dt)  # softplus, as mamba_ssm
        if DEFER > 0:
            slot = tl.load(count_ptr) % DEFER
            now = j == slot
            if B_LATE == 2:
                xs, dts = _buffered_x_dt(pend_x, pend_dt, j, channel, p_mask, head, stride_px_k, stride_pdt_k)
            dts = tl.where(now, dt, tl.where(j < slot, dts, 0.0))  # zero for the slots after this step
            xs = tl.where(now[:, None], x[None, :], xs)
            if B_LATE > 0:  # the buffered B read now, in the layer's dtype, and reduced at once: fewer registers
                bs = tl.load(pend_b + j[:, None] * stride_pb_k + n[None, :], mask=n_mask[None, :], other=0.0)
                bc = tl.where(now, tl.sum(B * C, axis=0), tl.sum(bs.to(tl.float32) * C[None, :], axis=1))
            else:
                bs = tl.where(now[:, None], B[None, :], bs)
            a = A * dts
            # the decay from step j to now, exp(a_(j+1) + .. + a_slot), each sum formed from its own terms
            after = (j[None, :] > j[:, None]) & (j <= slot)[None, :]
            weights = tl.exp(tl.sum(tl.where(after, a[None, :], 0.0), axis=1)) * dts
            total = tl.exp(tl.sum(a, axis=0))  # the decay of h0 over all of them
            y = total * tl.sum(state * C[None, :], axis=1)
            if B_LATE > 0:
                y += tl.sum(xs * (weights * bc)[:, None], axis=0)
            else:
                y += tl.sum(xs * (weights * tl.sum(bs * C[None, :], axis=1))[:, None], axis=0)
            # this step into its slot (x by each program for its channels, dt and B once per head / group)
            tl.store(pend_x + slot * stride_px_k + channel, x.to(pend_x_ptr.dtype.element_ty), mask=p_mask)
            tl.store(pend_dt + slot * stride_pdt_k + head, dt, mask=pid_p == 0)
            tl.store(pend_b + slot * stride_pb_k + n, B.to(pend_b_ptr.dtype.element_ty),
                     mask=n_mask & (pid_p == 0) & (head % heads_per_group == 0))
            if slot == DEFER - 1:  # the buffer is full: fold it into the state in memory
                if FOLD_COLS == 0:  # on the state tile held since the start
                    state = total * state + (dt * x)[:, None] * B[None, :]  # this step: decay 1
                    state = _add_buffered_steps(state, weights, j, pend_x, pend_b, channel, p_mask, n, n_mask,
                                                stride_px_k, stride_pb_k, DEFER)
                    tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=mask)
                else:  # FOLD_COLS state columns at a time, read again (from L2): fewer values live at once
                    for c0 in tl.static_range(0, BLOCK_S, FOLD_COLS):
                        cols = c0 + tl.arange(0, FOLD_COLS)
                        c_mask = cols < state_size
                        slice_ptrs = (state_ptr + batch * stride_s_b + head * stride_s_h + p[:, None] * stride_s_p
                                      + cols[None, :] * stride_s_n)
                        slice_mask = p_mask[:, None] & c_mask[None, :]
                        b_now = tl.load(proj + b_start + group * state_size + cols, mask=c_mask,
                                        other=0.0).to(tl.float32)
                        h = total * tl.load(slice_ptrs, mask=slice_mask, other=0.0).to(tl.float32)
                        h += (dt * x)[:, None] * b_now[None, :]
                        h = _add_buffered_steps(h, weights, j, pend_x, pend_b, channel, p_mask, cols, c_mask,
                                                stride_px_k, stride_pb_k, DEFER)
                        tl.store(slice_ptrs, h.to(state_ptr.dtype.element_ty), mask=slice_mask)
        else:
            state = state * tl.exp(A * dt) + (B * dt)[None, :] * x[:, None]
            tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=mask)
            y = tl.sum(state * C[None, :], axis=1)
        if HAS_D:
            y += x * tl.load(D_ptr + head).to(tl.float32)
        y = y.to(proj_ptr.dtype.element_ty).to(tl.float32)  # the SSM update's output dtype
        z = tl.load(proj + channel, mask=p_mask, other=0.0).to(tl.float32)
        y = tl.where(p_mask, y * (z * tl.sigmoid(z)), 0.0)
        tl.store(part_ptr + batch * stride_part_b + head * tl.num_programs(0) + pid_p, tl.sum(y * y, axis=0))
        # the gated norm's weight applied here; its scale (from the sums of squares) is out_proj's to apply
        y *= gated_w
        tl.store(y_ptr + batch * stride_y_b + channel, y.to(y_ptr.dtype.element_ty), mask=p_mask)
        _trace(trace_ptr, trace_slot, trace_stride, 2, TRACE)

    @triton.jit
    def gated_norm_out_proj(
        u_ptr, part_ptr, w_ptr, b_ptr, out_ptr, split_ptr, count_ptr, N, K, stride_wn, n_parts, parts_per_group,
        group_size, eps, HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_PARTS: tl.constexpr,
        USE_PDL: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PREFETCH: tl.constexpr = True,
        LAUNCH_EARLY: tl.constexpr = False,
    ):
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        # this program's share of the columns (split-K: out_proj has few rows and long ones)
        k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_end = tl.minimum((pid_k + 1) * k_len, K)
        # the weights do not depend on the previous kernel: the first tile is read before waiting for it
        if PREFETCH:
            w = _matvec_tile(w_ptr, rows, pid_k * k_len + tl.arange(0, BLOCK_K), row_mask, k_end, stride_wn)
        _wait_for_previous(USE_PDL, LAUNCH_EARLY)
        # the gated output's mean square per group, from the SSM kernel's per-block sums
        i = tl.arange(0, BLOCK_PARTS)
        parts = tl.load(part_ptr + i, mask=i < n_parts, other=0.0)
        g = tl.arange(0, BLOCK_G)
        in_group = (i // parts_per_group)[:, None] == g[None, :]
        inv_g = tl.rsqrt(tl.sum(tl.where(in_group, parts[:, None], 0.0), axis=0) / group_size + eps)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(pid_k * k_len, (pid_k + 1) * k_len, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = cols < K
            if PREFETCH:  # the next weight tile is in flight while this one is used
                w_next = _matvec_tile(w_ptr, rows, cols + BLOCK_K, row_mask, k_end, stride_wn)
            else:
                w = _matvec_tile(w_ptr, rows, cols, row_mask, k_end, stride_wn)
            u = tl.load(u_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if BLOCK_G > 1:  # each column's group scale (one group: the scale multiplies the product afterwards)
                u *= tl.sum(tl.where(((cols // group_size)[:, None] == g[None, :]), inv_g[None, :], 0.0), axis=1)
            acc += w.to(tl.float32) * u[None, :]
            if PREFETCH:
                w = w_next
        out = tl.sum(acc, axis=1)
        if BLOCK_G == 1:
            out *= tl.sum(inv_g, axis=0)
        out, last = _out_proj_total(out, rows, row_mask, rows, row_mask, b_ptr, split_ptr, N, count_ptr, pid_n, pid_k,
                                    HAS_BIAS, SPLIT_K)
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_mask & last)

    # ---- a few rows (batch 2-16): the same three steps with the products on tensor cores (tl.dot over a 16-row
    # tile), each weight tile read once for all rows; the SSM kernel above already takes any batch
    @triton.jit
    def norm_in_proj_conv_rows(
        res_ptr, prev_ptr, norm_w_ptr, res_out_ptr, w_ptr, b_ptr, out_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr,
        M, N, K, stride_wn, conv_start, conv_dim, stride_cs_b, stride_cs_c, stride_cs_k, stride_cw_c, stride_cw_k,
        eps, n_squares, HAS_BIAS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, SILU: tl.constexpr,
        D_CONV: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PREFETCH: tl.constexpr = True,
        LAUNCH_EARLY: tl.constexpr = False,
        NORMED: tl.constexpr = False, BLOCK_SQUARES: tl.constexpr = 1, PACKED_CONV: tl.constexpr = False,
        trace_ptr=None, trace_slot=0, trace_stride=0, TRACE: tl.constexpr = False,
    ):
        # NORMED: the previous layer's out_proj already formed this layer's input: res_ptr holds norm_w * h (the
        # product's input, unscaled) and prev_ptr `n_squares` partial sums of h^2 per row, so the loop only streams
        # the weight and that input into the tensor cores; else h = res + prev and its statistics are formed here
        pid = tl.program_id(0)
        dtype = norm_w_ptr.dtype.element_ty
        m = tl.arange(0, BLOCK_M)
        m_mask = m < M
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        kk = tl.arange(0, BLOCK_K)
        squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed: see _rows_dot
        if PREFETCH:
            w = _matvec_tile(w_ptr, rows, kk, row_mask, K, stride_wn)
        _trace(trace_ptr, trace_slot, trace_stride, 0, TRACE)
        _wait_for_previous(USE_PDL, LAUNCH_EARLY)
        _trace(trace_ptr, trace_slot, trace_stride, 1, TRACE)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + kk
            if PREFETCH:
                w_next = _matvec_tile(w_ptr, rows, cols + BLOCK_K, row_mask, K, stride_wn)
            else:
                w = _matvec_tile(w_ptr, rows, cols, row_mask, K, stride_wn)
            x_mask = m_mask[:, None] & (cols < K)[None, :]
            if NORMED:
                x = tl.load(res_ptr + m[:, None] * K + cols[None, :], mask=x_mask, other=0.0)
                acc = _rows_dot(x, w, acc, IEEE)
            else:
                h = tl.load(res_ptr + m[:, None] * K + cols[None, :], mask=x_mask, other=0.0).to(tl.float32)
                h += tl.load(prev_ptr + m[:, None] * K + cols[None, :], mask=x_mask, other=0.0).to(tl.float32)
                h = h.to(res_out_ptr.dtype.element_ty)
                tl.store(res_out_ptr + m[:, None] * K + cols[None, :], h, mask=x_mask & (pid == 0))
                x = h.to(dtype).to(tl.float32)
                squares += x * x
                x = tl.load(norm_w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :] * x
                acc = _rows_dot(x.to(w.dtype), w, acc, IEEE)
            if PREFETCH:
                w = w_next
        acc = tl.trans(acc)
        if NORMED:
            i = tl.arange(0, BLOCK_SQUARES)
            total = tl.sum(tl.load(prev_ptr + m[:, None] * n_squares + i[None, :],
                                   mask=m_mask[:, None] & (i < n_squares)[None, :], other=0.0), axis=1)
        else:
            total = tl.sum(squares, axis=1)
        val = acc * tl.rsqrt(total / K + eps)[:, None]
        if HAS_BIAS:
            val += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        val = val.to(out_ptr.dtype.element_ty).to(tl.float32)
        # the conv update of the xBC channels, per row of the batch
        c = rows - conv_start
        is_conv = row_mask & (c >= 0) & (c < conv_dim)
        if PACKED_CONV:
            # 16-bit states and weights, 4 taps: a channel's state (and its conv weights) as one 64-bit word, the
            # oldest tap in the low bits (conv_state_ptr, conv_w_ptr: int64 views), so that the update is one load
            # and one store per channel instead of 2-byte accesses per tap
            dtype16 = out_ptr.dtype.element_ty
            word_mask = m_mask[:, None] & is_conv[None, :]
            words = tl.load(conv_state_ptr + m[:, None] * stride_cs_b + c[None, :], mask=word_mask, other=0)
            newest = val.to(dtype16).to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF
            words = ((words >> 16) & 0xFFFFFFFFFFFF) | (newest << 48)
            tl.store(conv_state_ptr + m[:, None] * stride_cs_b + c[None, :], words, mask=word_mask)
            weight_words = tl.load(conv_w_ptr + c, mask=is_conv, other=0)
            conv = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for tap in tl.static_range(D_CONV):
                x_tap = ((words >> (16 * tap)) & 0xFFFF).to(tl.int16).to(dtype16, bitcast=True).to(tl.float32)
                w_tap = ((weight_words >> (16 * tap)) & 0xFFFF).to(tl.int16).to(dtype16, bitcast=True)
                conv += x_tap * w_tap.to(tl.float32)[None, :]
        else:
            j = tl.arange(0, BLOCK_C)
            conv_mask = m_mask[:, None, None] & is_conv[None, :, None] & (j < D_CONV)[None, None, :]
            base = conv_state_ptr + m[:, None, None] * stride_cs_b + c[None, :, None] * stride_cs_c
            shifted = tl.load(base + (j + 1)[None, None, :] * stride_cs_k,
                              mask=conv_mask & (j + 1 < D_CONV)[None, None, :], other=0.0)
            state_dtype = conv_state_ptr.dtype.element_ty
            window = tl.where((j == D_CONV - 1)[None, None, :], val.to(state_dtype)[:, :, None], shifted)
            tl.store(base + j[None, None, :] * stride_cs_k, window, mask=conv_mask)
            conv_w = tl.load(conv_w_ptr + c[:, None] * stride_cw_c + j[None, :] * stride_cw_k,
                             mask=is_conv[:, None] & (j < D_CONV)[None, :], other=0.0).to(tl.float32)
            conv = tl.sum(window.to(tl.float32) * conv_w[None, :, :], axis=2)
        if HAS_CONV_BIAS:
            conv += tl.load(conv_b_ptr + c, mask=is_conv, other=0.0).to(tl.float32)[None, :]
        if SILU:
            conv = conv * tl.sigmoid(conv)
        val = tl.where(is_conv[None, :], conv, val)
        tl.store(out_ptr + m[:, None] * N + rows[None, :], val.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & row_mask[None, :])
        _trace(trace_ptr, trace_slot, trace_stride, 2, TRACE)

    @triton.jit
    def gated_norm_out_proj_rows(
        u_ptr, part_ptr, w_ptr, b_ptr, out_ptr, split_ptr, count_ptr, res_ptr, res_out_ptr, next_norm_w_ptr,
        squares_ptr,
        M, N, K, stride_wn, n_parts, parts_per_group, group_size, eps, HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_PARTS: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PREFETCH: tl.constexpr = True,
        LAUNCH_EARLY: tl.constexpr = False,
        NEXT: tl.constexpr = False,
        trace_ptr=None, trace_slot=0, trace_stride=0, TRACE: tl.constexpr = False,
    ):
        # NEXT: instead of the mixer output, form the next layer's input (see norm_in_proj_conv_rows's NORMED): the
        # block's output h = residual + mixer output into res_out_ptr, next_norm_w * h into out_ptr, and per row
        # this program's sum of h^2 into squares_ptr (one column per row block, summed in order by the next in_proj)
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        m = tl.arange(0, BLOCK_M)
        m_mask = m < M
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        kk = tl.arange(0, BLOCK_K)
        k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_end = tl.minimum((pid_k + 1) * k_len, K)
        if PREFETCH:
            w = _matvec_tile(w_ptr, rows, pid_k * k_len + kk, row_mask, k_end, stride_wn)
        _trace(trace_ptr, trace_slot, trace_stride, 0, TRACE)
        _wait_for_previous(USE_PDL, LAUNCH_EARLY)
        _trace(trace_ptr, trace_slot, trace_stride, 1, TRACE)
        # each row's mean square per group, from the SSM kernel's per-block sums
        i = tl.arange(0, BLOCK_PARTS)
        parts = tl.load(part_ptr + m[:, None] * n_parts + i[None, :], mask=m_mask[:, None] & (i < n_parts)[None, :],
                        other=0.0)
        g = tl.arange(0, BLOCK_G)
        in_group = (i // parts_per_group)[:, None] == g[None, :]
        inv = tl.rsqrt(tl.sum(tl.where(in_group[None, :, :], parts[:, :, None], 0.0), axis=1) / group_size + eps)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed: see _rows_dot
        for k0 in range(pid_k * k_len, (pid_k + 1) * k_len, BLOCK_K):
            cols = k0 + kk
            if PREFETCH:
                w_next = _matvec_tile(w_ptr, rows, cols + BLOCK_K, row_mask, k_end, stride_wn)
            else:
                w = _matvec_tile(w_ptr, rows, cols, row_mask, k_end, stride_wn)
            u = tl.load(u_ptr + m[:, None] * K + cols[None, :], mask=m_mask[:, None] & (cols < K)[None, :],
                        other=0.0).to(tl.float32)
            if BLOCK_G > 1:
                in_col_group = (cols // group_size)[None, :, None] == g[None, None, :]
                u *= tl.sum(tl.where(in_col_group, inv[:, None, :], 0.0), axis=2)
            acc = _rows_dot(u.to(w.dtype), w, acc, IEEE)
            if PREFETCH:
                w = w_next
        out = tl.trans(acc)
        if BLOCK_G == 1:
            out *= tl.sum(inv, axis=1)[:, None]
        offsets = m[:, None] * N + rows[None, :]
        mask = m_mask[:, None] & row_mask[None, :]
        out, last = _out_proj_total(out, offsets, mask, rows[None, :], row_mask[None, :], b_ptr, split_ptr, M * N,
                                    count_ptr, pid_n, pid_k, HAS_BIAS, SPLIT_K)
        mask = mask & last
        out = out.to(out_ptr.dtype.element_ty)  # the mixer output's dtype
        if NEXT:
            h = tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + out.to(tl.float32)
            h = h.to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + offsets, h, mask=mask)
            x = h.to(next_norm_w_ptr.dtype.element_ty).to(tl.float32)  # the norm's input dtype
            tl.store(squares_ptr + m * tl.num_programs(0) + pid_n, tl.sum(x * x, axis=1), mask=m_mask & last)
            x *= tl.load(next_norm_w_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offsets, x.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + offsets, out, mask=mask)
        _trace(trace_ptr, trace_slot, trace_stride, 2, TRACE)

    if autotune:
        configs = [
            triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
            for n, k, w, st in [
                (4, 512, 4, 4), (8, 256, 4, 4), (8, 512, 4, 3), (8, 512, 8, 3), (16, 256, 4, 4), (16, 256, 8, 4),
                (16, 512, 8, 3), (32, 128, 4, 4), (32, 256, 8, 3), (4, 1024, 4, 3), (8, 1024, 8, 2),
                (16, 1024, 8, 2), (32, 512, 8, 2), (64, 128, 8, 2), (64, 256, 8, 2), (32, 256, 4, 2),
            ]
        ]
        # autotuning runs the kernel several times: the conv state it updates is put back after each trial
        norm_in_proj_conv = triton.autotune(configs, key=["N", "K"], restore_value=["conv_state_ptr"])(
            norm_in_proj_conv
        )
        split_configs = [
            triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": split}, num_warps=w, num_stages=st)
            for n, k, w, st, split in [
                (4, 512, 4, 4, 1), (8, 512, 4, 3, 1), (16, 256, 4, 4, 1), (8, 256, 4, 4, 2), (8, 512, 4, 3, 2),
                (16, 256, 4, 4, 2), (16, 512, 8, 3, 2), (32, 256, 8, 3, 2), (8, 256, 4, 4, 4), (16, 256, 4, 4, 4),
                (32, 128, 4, 4, 4), (32, 512, 8, 2, 2), (64, 128, 8, 2, 2), (16, 512, 8, 2, 4), (32, 256, 8, 2, 4),
            ]
        ]
        gated_norm_out_proj = triton.autotune(split_configs, key=["N", "K"])(gated_norm_out_proj)
        row_configs = [
            triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
            for n, k, w, st in [
                (16, 128, 4, 2), (32, 128, 4, 2), (64, 64, 4, 2), (64, 128, 4, 2), (32, 256, 4, 2), (128, 64, 8, 2),
                (64, 256, 8, 2), (16, 256, 4, 2),
            ]
        ]
        norm_in_proj_conv_rows = triton.autotune(row_configs, key=["M", "N", "K"], restore_value=["conv_state_ptr"])(
            norm_in_proj_conv_rows
        )
        row_split_configs = [
            triton.Config({**c.kwargs, "SPLIT_K": split}, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in row_configs for split in (1, 2)
        ]
        gated_norm_out_proj_rows = triton.autotune(row_split_configs, key=["M", "N", "K"])(gated_norm_out_proj_rows)
    return triton, (norm_in_proj_conv, ssm_step_gate, gated_norm_out_proj, norm_in_proj_conv_rows,
                    gated_norm_out_proj_rows)


def fused_kernels():
    """(triton, kernels) for the batch-1 fused layer, or None without Triton or CUDA, or when MLMAMBA_TRITON_GEMV=0
    (which turns off all of this file's Triton kernels)."""
    if not _FUSED:
        found = None
        if os.environ.get("MLMAMBA_TRITON_GEMV", "1") != "0" and torch.cuda.is_available():
            try:
                found = _fused_kernels()
            except Exception:  # no Triton, or one that cannot build these kernels
                found = None
        _FUSED.append(found)
    return _FUSED[0]


def _programmatic_launch_supported(triton) -> bool:
    """Programmatic dependent launch (Hopper and newer, Triton with `gdc_wait`): each of the fused kernels may start
    while the previous one finishes, reading its weights (and the SSM state) before it waits for the previous
    kernel's output (`griddepcontrol.wait`). MLMAMBA_PDL=0 turns it off."""
    try:
        from triton.language.extra import cuda as triton_cuda

        return (
            os.environ.get("MLMAMBA_PDL", "1") != "0"
            and hasattr(triton_cuda, "gdc_wait")
            and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] >= 9
        )
    except Exception:
        return False


def make_fused_block_step(language_model, kernels=None, block_sizes: dict | None = None, pdl: bool | None = None):
    """`make_block_step`'s function (same arguments, same results, states updated in place) as three Triton kernels
    (see above) for up to `FUSED_MAX_ROWS` sequences: matrix-vector kernels for one, tensor-core tiles of 16 rows for
    more; None when `fused_kernels()` finds none.

    The products' launch configurations come from `TUNED_CONFIGS` where it has the shape (measured in the captured
    step), from Triton's autotuner otherwise. `kernels` (e.g. `_fused_kernels(autotune=False)`) and `block_sizes`
    fix them instead (tests under Triton's interpreter, benchmarks/experiments.py): either BLOCK_N, BLOCK_K (and
    SPLIT_K for out_proj) for both products, or {"in_proj": {...}, "out_proj": {...}} with each product's own
    meta-parameters (BLOCK_N, BLOCK_K, SPLIT_K, PREFETCH, num_warps, num_stages). `pdl`: programmatic dependent
    launch (by default where the GPU and Triton support it); with it, each kernel lets the next one launch once its
    own programs have started (MLMAMBA_PDL_EARLY=0: once they have waited for their inputs).

    Chaining (2-16 sequences, out_proj's configuration fixed or tuned): called with `next_norm_w` (the next block's
    RMSNorm weight), the function returns (the next block's input h, `ChainedInput`) instead of (residual, mixer
    output), and takes that pair as its (residual, out) on the next layer; the last layer, called without
    `next_norm_w`, returns the plain pair. The function carries `chains_layers = True` for callers to detect it.

    `pending` (a `DeferredUpdates`, any batch size): the SSM state is written back every K steps only, the steps in
    between kept in its buffers (the caller adds one to its count after each step of all layers); without it the
    state is updated in place every step."""
    found = fused_kernels() if kernels is None else kernels
    if found is None:
        return None
    triton, (norm_in_proj_conv, ssm_step_gate, gated_norm_out_proj, norm_in_proj_conv_rows,
             gated_norm_out_proj_rows) = found
    s = _block_shape(language_model)
    fixed = _fixed_configs(block_sizes)
    counters: dict = {}  # device → out_proj's per-row-block counters (zero between calls: each call resets them)
    use_pdl = _programmatic_launch_supported(triton) if pdl is None else pdl
    early = os.environ.get("MLMAMBA_PDL_EARLY", "1") != "0"  # measured ~1% faster at batches 1 and 8 on an H100
    pdl = dict(USE_PDL=True, LAUNCH_EARLY=early, launch_pdl=True) if use_pdl else dict(USE_PDL=False)
    # MLMAMBA_PDL_IN=0 (an experiment; 2-16 rows): in_proj launched once out_proj has finished, so that its programs
    # spread over all SMs instead of fitting beside out_proj's, still letting the SSM update launch early
    pdl_in = pdl
    if use_pdl and os.environ.get("MLMAMBA_PDL_IN", "1") == "0":
        pdl_in = dict(USE_PDL=True, LAUNCH_EARLY=early)
    # MLMAMBA_SSM_BLOCK_P / MLMAMBA_SSM_WARPS (experiments): the SSM update's head-dim rows per program and warps
    # (by default SSM_WARPS at batch 1, SSM_WARPS_ROWS at 2-16)
    block_p = min(int(os.environ.get("MLMAMBA_SSM_BLOCK_P", _SSM_BLOCK_P)), triton.next_power_of_2(s.head_dim))
    warps_env = os.environ.get("MLMAMBA_SSM_WARPS")

    def ssm_warps(batch: int) -> int:
        return int(warps_env) if warps_env else (SSM_WARPS if batch == 1 else SSM_WARPS_ROWS)
    # MLMAMBA_SSM_MAXNREG (experiments): a cap on the SSM update's registers per thread (ptxas's .maxnreg), so that
    # more of its programs fit beside in_proj's
    ssm_regs = {"maxnreg": int(os.environ["MLMAMBA_SSM_MAXNREG"])} if os.environ.get("MLMAMBA_SSM_MAXNREG") else {}
    # deferred state writes (`pending`) at 2-16 rows: the variant with fewer registers (at K = 16: 127 instead of
    # 160-168 per thread, so that more SSM programs fit beside in_proj's): the write-back DEFER_FOLD_COLS state
    # columns at a time (read again from L2) and the buffered B read after the wait and reduced at once; measured on
    # an H100 at batch 8, K = 16, ms per step: float32 state 3.53 against 3.63 for the whole tile, bf16 3.40 against
    # 3.46 (docs/benchmarks.md); at batch 1 the whole tile is faster (2.32 against 2.40). MLMAMBA_DEFER_FOLD_COLS (a
    # power of two; 0: the whole tile) and MLMAMBA_DEFER_B_LATE (0: the buffered steps read before the wait; 1: their
    # B after it; 2: their x, dt and B after it), where set, choose for every batch size
    fold_cols_env = os.environ.get("MLMAMBA_DEFER_FOLD_COLS")
    b_late_env = os.environ.get("MLMAMBA_DEFER_B_LATE")
    if fold_cols_env is not None and not (fold_cols_env.isdigit()
                                          and int(fold_cols_env) & (int(fold_cols_env) - 1) == 0):
        raise ValueError(f"MLMAMBA_DEFER_FOLD_COLS must be 0 or a power of two, got {fold_cols_env!r}")
    if b_late_env not in (None, "0", "1", "2"):
        raise ValueError(f"MLMAMBA_DEFER_B_LATE must be 0, 1 or 2, got {b_late_env!r}")
    block_s = triton.next_power_of_2(s.state)

    def defer_variant(batch: int) -> dict:
        fold_cols = int(fold_cols_env) if fold_cols_env is not None else (0 if batch == 1 else DEFER_FOLD_COLS)
        b_late = int(b_late_env) if b_late_env is not None else (DEFER_LATE_ROWS if batch > 1 else 0)
        return dict(FOLD_COLS=min(fold_cols, block_s), B_LATE=b_late)
    blocks_per_head = triton.cdiv(s.head_dim, block_p)
    n_parts = s.heads * blocks_per_head
    x_start = s.intermediate  # in the projection: [gate | x | B | C | dt]
    b_start = x_start + s.intermediate
    c_start = b_start + s.groups * s.state
    dt_start = c_start + s.groups * s.state

    def grid(n):
        return lambda m: (triton.cdiv(n, m["BLOCK_N"]), m.get("SPLIT_K", 1))

    # MLMAMBA_TRACE=1 (benchmarks/experiments.py --part timeline): the 2-16-row kernels record each program's
    # start / inputs-ready / done times in `block_step.trace["buffer"]`, one slot per launch from trace["next"] on
    trace = {"buffer": None, "next": 0, "programs": 16384} if os.environ.get("MLMAMBA_TRACE") == "1" else None

    def trace_args(device) -> dict:
        if trace is None:
            return {}
        if trace["buffer"] is None:
            trace["buffer"] = torch.zeros(256, trace["programs"], 4, device=device, dtype=torch.int64)
        slot, trace["next"] = trace["next"], trace["next"] + 1
        return dict(trace_ptr=trace["buffer"], trace_slot=slot % 256, trace_stride=trace["programs"], TRACE=True)

    def block_step(residual, out, conv_state, ssm_state, norm_w, in_w, in_b, conv_w, conv_b, dt_bias, A_log, D,
                   gated_w, out_w, out_b, next_norm_w=None, pending=None):
        batch = residual.shape[0]
        if (
            not 1 <= batch <= FUSED_MAX_ROWS
            or residual.shape[1:] != (1, in_w.shape[1])
            or conv_state.shape[-1] != conv_w.shape[-1]
        ):
            raise ValueError(
                f"the fused decode layer takes one token of 1 to {FUSED_MAX_ROWS} sequences (residual (batch, 1, "
                f"{in_w.shape[1]}), conv state as long as the conv kernel, {conv_w.shape[-1]}); got residual "
                f"{tuple(residual.shape)}, conv state {tuple(conv_state.shape)}"
            )
        if pending is not None:
            pending.check(batch, s)
        with torch.cuda.device(residual.device) if residual.is_cuda else contextlib.nullcontext():  # Triton's device
            return _launch(residual, out, conv_state, ssm_state, norm_w, in_w, in_b, conv_w, conv_b, dt_bias, A_log,
                           D, gated_w, out_w, out_b, next_norm_w, pending)

    def _launch(residual, out, conv_state, ssm_state, norm_w, in_w, in_b, conv_w, conv_b, dt_bias, A_log, D,
                gated_w, out_w, out_b, next_norm_w, pending):
        batch = residual.shape[0]
        chained = isinstance(out, ChainedInput)  # the previous layer formed this one's input (and residual)
        if chained:
            res_out, squares = residual, out.squares
            out = out.normed
        else:
            residual, out = residual.contiguous(), out.contiguous()
            res_out = torch.empty_like(residual)
        n_in, k_in = in_w.shape
        projected = out.new_empty(batch, 1, n_in)
        conv_w2 = conv_w.view(conv_w.shape[0], conv_w.shape[-1])
        kind = "matvec" if batch == 1 else "rows"
        in_kernel, in_meta = _product_launch(
            norm_in_proj_conv if batch == 1 else norm_in_proj_conv_rows, fixed, "in_proj", kind, in_w)
        conv_args = dict(HAS_BIAS=in_b is not None, HAS_CONV_BIAS=conv_b is not None,
                         SILU=s.activation in ("silu", "swish"), D_CONV=conv_w.shape[-1],
                         BLOCK_C=triton.next_power_of_2(conv_w.shape[-1]), **(pdl_in if batch > 1 else pdl),
                         **in_meta)
        if batch == 1:
            if chained:
                raise ValueError("a chained input (ChainedInput) is formed for 2-16 sequences only")
            in_kernel[grid(n_in)](
                residual, out, norm_w, res_out, in_w, in_b if in_b is not None else in_w, projected,
                conv_state, conv_w2, conv_b if conv_b is not None else conv_w2,
                n_in, k_in, in_w.stride(0), s.intermediate, s.conv_dim, conv_state.stride(1), conv_state.stride(2),
                conv_w2.stride(0), conv_w2.stride(1), s.norm_eps, **conv_args,
            )
        else:  # 2-16 rows; chained, the normalised input and its sums of squares come in place of residual and out
            packed = (conv_w.shape[-1] == 4 and conv_state.dtype == conv_w2.dtype == projected.dtype
                      and conv_state.dtype in (torch.bfloat16, torch.float16) and conv_state.stride()[1:] == (4, 1)
                      and conv_w2.stride() == (4, 1) and conv_state.data_ptr() % 8 == 0
                      and conv_w2.data_ptr() % 8 == 0)
            states = conv_state.view(torch.int64) if packed else conv_state
            taps = conv_w2.view(torch.int64) if packed else conv_w2
            in_kernel[grid(n_in)](
                out if chained else residual, squares if chained else out, norm_w, res_out, in_w,
                in_b if in_b is not None else in_w, projected,
                states, taps, conv_b if conv_b is not None else conv_w2,
                batch, n_in, k_in, in_w.stride(0), s.intermediate, s.conv_dim, *states.stride(),
                taps.stride(0), taps.stride(1), s.norm_eps, squares.shape[1] if chained else 0, PACKED_CONV=packed,
                # a tile of 8 rows where the batch fits (mma m16n8k16 in the PTX: measured ~3% faster at batch 8)
                IEEE=in_w.dtype == torch.float32, BLOCK_M=8 if batch <= 8 else FUSED_MAX_ROWS, NORMED=chained,
                BLOCK_SQUARES=triton.next_power_of_2(squares.shape[1]) if chained else 1, **conv_args,
                **trace_args(out.device),
            )
        gated = out_w.new_empty(batch, s.intermediate)
        parts = torch.empty(batch, n_parts, device=out.device, dtype=torch.float32)
        deferred = {} if pending is None else dict(
            pend_x_ptr=pending.x, pend_dt_ptr=pending.dt, pend_b_ptr=pending.b, count_ptr=pending.count,
            stride_px_b=pending.x.stride(0), stride_px_k=pending.x.stride(1), stride_pdt_b=pending.dt.stride(0),
            stride_pdt_k=pending.dt.stride(1), stride_pb_b=pending.b.stride(0), stride_pb_k=pending.b.stride(1),
            DEFER=pending.x.shape[1], **defer_variant(batch))
        ssm_step_gate[(blocks_per_head, s.heads, batch)](
            projected, ssm_state, A_log, D, dt_bias, gated_w, gated, parts,
            projected.stride(0), *ssm_state.stride(), gated.stride(0), parts.stride(0),
            x_start, b_start, c_start, dt_start, s.heads // s.groups, s.head_dim, s.state,
            HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, BLOCK_P=block_p,
            # few warps: as fast alone as 4 (benchmarks/experiments.py --part ssm), and more of its programs fit
            # beside in_proj's, where they read their state before in_proj has finished (programmatic launch)
            BLOCK_S=block_s, num_warps=ssm_warps(batch), **ssm_regs, **pdl,
            **(trace_args(out.device) if batch > 1 else {}), **deferred,
        )
        n_out, k_out = out_w.shape
        new_out = out.new_empty(batch, 1, n_out)
        count = counters.get(out.device)
        if count is None or count.numel() < n_out:
            count = counters[out.device] = torch.zeros(n_out, device=out.device, dtype=torch.int32)
        out_kernel, out_meta = _product_launch(
            gated_norm_out_proj if batch == 1 else gated_norm_out_proj_rows, fixed, "out_proj", kind, out_w)
        # the split-K partial sums (the autotuned configs split out_proj's columns in up to 4)
        split = torch.empty(out_meta.get("SPLIT_K", 4), batch, n_out, device=out.device, dtype=torch.float32)
        norm_args = dict(HAS_BIAS=out_b is not None, BLOCK_G=triton.next_power_of_2(s.groups),
                         BLOCK_PARTS=triton.next_power_of_2(n_parts), **pdl, **out_meta)
        if batch == 1:
            out_kernel[grid(n_out)](
                gated, parts, out_w, out_b if out_b is not None else out_w, new_out, split, count, n_out, k_out,
                out_w.stride(0), n_parts, n_parts // s.groups, s.group_size, s.gated_eps, **norm_args,
            )
            return res_out, new_out
        # 2-16 rows: with the next layer's norm weight (and out_proj's row blocks known), form its input here
        chain = next_norm_w is not None and "BLOCK_N" in out_meta
        if chain:
            next_squares = torch.empty(batch, triton.cdiv(n_out, out_meta["BLOCK_N"]), device=out.device,
                                       dtype=torch.float32)
            next_res = torch.empty_like(res_out)
        out_kernel[grid(n_out)](
            gated, parts, out_w, out_b if out_b is not None else out_w, new_out, split, count, res_out,
            next_res if chain else res_out, next_norm_w if chain else out_w, next_squares if chain else parts,
            batch, n_out, k_out, out_w.stride(0), n_parts, n_parts // s.groups, s.group_size, s.gated_eps,
            IEEE=out_w.dtype == torch.float32, BLOCK_M=FUSED_MAX_ROWS, NEXT=chain, **norm_args,
            **trace_args(out.device),
        )
        if chain:
            return next_res, ChainedInput(new_out, next_squares)
        return res_out, new_out

    block_step.chains_layers = True
    block_step.trace = trace
    return block_step


class ChainedInput(NamedTuple):
    """What the fused layer hands the next one for 2-16 sequences when given the next layer's norm weight
    (`next_norm_w`), in place of its mixer output: the next block's input scaled by that norm's weight but not yet
    by its RMS (`normed`, (batch, 1, hidden)), and the sums of squares that give the RMS (`squares`, per row, one
    per out_proj row block); the residual it returns beside it is already the next block's input h. The next
    layer's in_proj then only streams its weights and this input (norm_in_proj_conv_rows, NORMED)."""

    normed: torch.Tensor
    squares: torch.Tensor


# the fused layer writes the SSM state back every this many decode steps (MLMAMBA_DEFER_STEPS): measured on an H100
# (docs/benchmarks.md, ms per step): batch 1, K = 16: float32 state 2.48 -> 2.32, bf16 2.43 -> 2.31 (K = 8: 2.33);
# batch 8, K = 8 with the write-back in column slices: float32 3.79 -> 3.45, bf16 3.28 -> 3.25 (K = 16: 3.53 / 3.46)
DEFERRED_STEPS, DEFERRED_STEPS_ROWS = 16, 8  # at batch 1, at 2-16
DEFER_FOLD_COLS = 32  # at 2-16 rows, the deferred write-back folds this many state columns at a time
DEFER_LATE_ROWS = 2  # at 2-16 rows, the buffered steps' x, dt and B are read after the wait (ssm_step_gate, B_LATE)


def deferred_steps(batch_size: int) -> int:
    """K, the number of decode steps after which the fast path's fused layer writes the SSM states of `batch_size`
    sequences back to memory (`DeferredUpdates`): MLMAMBA_DEFER_STEPS where set (0 or 1: every step), else
    DEFERRED_STEPS (16) at batch 1, DEFERRED_STEPS_ROWS (8) at 2-16."""
    value = os.environ.get("MLMAMBA_DEFER_STEPS", str(DEFERRED_STEPS if batch_size == 1 else DEFERRED_STEPS_ROWS))
    try:
        steps = int(value)
    except ValueError:
        raise ValueError(f"MLMAMBA_DEFER_STEPS must be a power of two (0: off), got {value!r}") from None
    if steps > 1 and steps & (steps - 1):
        raise ValueError(f"MLMAMBA_DEFER_STEPS must be a power of two (0: off), got {steps}")
    return steps if steps > 1 else 0


def defer_state_writes(batch_size: int, fused_max_batch: int) -> bool:
    """Whether the fused layer's decode step of `batch_size` sequences (it runs up to `fused_max_batch`) writes the
    SSM states back every `deferred_steps(batch_size)` steps only: wherever the fused layer runs (measured faster
    there with either state dtype: see DEFERRED_STEPS), unless MLMAMBA_DEFER_STEPS=0."""
    return 1 <= batch_size <= fused_max_batch and deferred_steps(batch_size) > 0


class DeferredUpdates(NamedTuple):
    """One layer's SSM updates not yet written into its state, for the fused layer's `pending` argument.

    A decode step reads the whole SSM state (h, 0.17 GB in float32 for the released LM at batch 1) and, as
    transformers' and mamba_ssm's steps do, writes it back: at batch 8 that is 2.7 GB per token beside 5.4 GB of
    weights. Mamba-2's A is one number per head, so K steps unroll exactly (the recurrence h_t = exp(A dt_t) h_(t-1)
    + dt_t x_t B_t^T read off K steps later): the fused SSM update keeps the state of the last write, h0, and each
    step's (x, dt, B) in these buffers, computes each output from h0 and the buffered steps, and writes the state
    back once the K-th step is in (slot K - 1). The state in memory then lags the true state by `count % K` steps,
    which `PendingSteps.fold` puts in before anyone else reads it.

    x: (batch, K, intermediate), dt: (batch, K, heads) float32 (after the softplus), b: (batch, K, groups × state),
    count: (1,) int32, the steps taken since the buffers were last empty (all layers share it; the decode step adds
    one after its last layer)."""

    x: torch.Tensor
    dt: torch.Tensor
    b: torch.Tensor
    count: torch.Tensor

    def check(self, batch: int, shape: "_BlockShape") -> None:
        steps = self.x.shape[1] if self.x.dim() == 3 else 0
        expected = {"x": (batch, steps, shape.intermediate), "dt": (batch, steps, shape.heads),
                    "b": (batch, steps, shape.groups * shape.state), "count": (1,)}
        got = {name: tuple(getattr(self, name).shape) for name in expected}
        if got != expected or steps < 2 or steps & (steps - 1) or self.dt.dtype != torch.float32 \
                or self.count.dtype != torch.int32 or any(t.stride(-1) != 1 for t in (self.x, self.dt, self.b)):
            raise ValueError(
                f"pending updates (DeferredUpdates) for {batch} sequences over K (a power of two >= 2) steps take x "
                f"{expected['x']}, dt {expected['dt']} (float32), b {expected['b']} (last dimensions contiguous) and "
                f"count (1,) (int32); got {got}, dt {self.dt.dtype}, count {self.count.dtype}"
            )


class PendingSteps:
    """The fast path's deferred SSM updates of a whole cache (see `DeferredUpdates`): one set of buffers per layer,
    the device-side step count the kernels read, and `steps`, its mirror on the host (counted per replay, never read
    back from the device)."""

    def __init__(self, num_layers: int, batch_size: int, steps: int, shape: "_BlockShape", dtype: torch.dtype,
                 device):
        self.shape = shape
        # zero-filled: slots not written yet this round are multiplied by zero weights
        self.x = torch.zeros(num_layers, batch_size, steps, shape.intermediate, dtype=dtype, device=device)
        self.dt = torch.zeros(num_layers, batch_size, steps, shape.heads, dtype=torch.float32, device=device)
        self.b = torch.zeros(num_layers, batch_size, steps, shape.groups * shape.state, dtype=dtype, device=device)
        self.count = torch.zeros(1, dtype=torch.int32, device=device)
        self.steps = 0

    @property
    def length(self) -> int:
        """K: a layer's state is written back every K steps."""
        return self.x.shape[2]

    @property
    def pending(self) -> int:
        """How many steps the states in memory lag behind."""
        return self.steps % self.length

    def layer(self, index: int) -> DeferredUpdates:
        return DeferredUpdates(self.x[index], self.dt[index], self.b[index], self.count)

    def reset(self) -> None:
        """Nothing pending (after a prefill, or once `fold` has put the pending steps into the states)."""
        self.count.zero_()
        self.steps = 0

    def snapshot(self) -> tuple:
        return self.x.clone(), self.dt.clone(), self.b.clone(), self.count.clone(), self.steps

    def restore(self, saved: tuple) -> None:
        for t, value in zip((self.x, self.dt, self.b, self.count), saved):
            t.copy_(value)
        self.steps = saved[-1]

    @torch.no_grad()
    def fold(self, states: list[torch.Tensor], A_logs: list[torch.Tensor]) -> None:
        """Puts the pending steps into the layers' SSM states (`states[i]`: (batch, heads, head_dim, state), updated
        in place), as the kernel does when a round of K steps is complete, and resets the count."""
        n = self.pending
        if n:
            s = self.shape
            dt = self.dt[:, :, :n]  # (layers, batch, n, heads)
            a = -torch.exp(torch.stack([A_log.float() for A_log in A_logs]))[:, None, None, :] * dt
            after = torch.ones(n, n, device=dt.device).triu(1)  # after[j, i]: step i came after step j
            weights = torch.exp(torch.einsum("lbih,ji->lbjh", a, after)) * dt
            totals = torch.exp(a.sum(2))  # (layers, batch, heads)
            group_of_head = torch.arange(s.heads, device=dt.device) // (s.heads // s.groups)
            batch = dt.shape[1]
            for index, state in enumerate(states):
                x = self.x[index, :, :n].float().view(batch, n, s.heads, s.head_dim)
                b = self.b[index, :, :n].float().view(batch, n, s.groups, s.state)[:, :, group_of_head]
                update = torch.einsum("bjh,bjhp,bjhs->bhps", weights[index], x, b)
                state.copy_(totals[index][..., None, None] * state.float() + update)
        self.reset()


# Launch configurations of the fused layer's products measured in the captured decode step of the released model
# (benchmarks/experiments.py --part sweep: all 64 layers replayed from one CUDA graph, so that no weight is in L2 and
# the kernels overlap as they do in generate()). Triton's autotuner times one kernel at a time on the same weights,
# and its ranking of these ~10-25 µs kernels does not carry over to the step. Key: (compute capability, product,
# "matvec" for one sequence or "rows" for more, weight rows, weight columns, weight dtype).
TUNED_CONFIGS: dict[tuple, dict] = {
    # H100 (sm_90), Mamba-2 2.7B in bf16
    ((9, 0), "in_proj", "matvec", 10576, 2560, "bfloat16"): dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=2),
    ((9, 0), "out_proj", "matvec", 2560, 5120, "bfloat16"): dict(BLOCK_N=4, BLOCK_K=1024, SPLIT_K=1, num_warps=4,
                                                                 num_stages=2),
    ((9, 0), "in_proj", "rows", 10576, 2560, "bfloat16"): dict(BLOCK_N=64, BLOCK_K=64, PREFETCH=False,
                                                               num_warps=4, num_stages=6),
    ((9, 0), "out_proj", "rows", 2560, 5120, "bfloat16"): dict(BLOCK_N=64, BLOCK_K=256, SPLIT_K=2,
                                                               PREFETCH=False, num_warps=4, num_stages=3),
}


def _tuned_key(device, product: str, kind: str, weight: torch.Tensor) -> tuple:
    return (torch.cuda.get_device_capability(device), product, kind, *weight.shape,
            str(weight.dtype).removeprefix("torch."))


def has_tuned_configs(language_model, kind: str, device) -> bool:
    """Whether TUNED_CONFIGS holds both products of `language_model` for `kind` ("matvec": one sequence, "rows": 2-16)
    on the CUDA `device`."""
    if torch.device(device).type != "cuda":
        return False
    mixer = language_model.layers[0].mixer
    return all(_tuned_key(device, product, kind, weight) in TUNED_CONFIGS
               for product, weight in (("in_proj", mixer.in_proj.weight), ("out_proj", mixer.out_proj.weight)))


def _fixed_configs(block_sizes: dict | None) -> dict | None:
    if not block_sizes:
        return None
    if "in_proj" in block_sizes or "out_proj" in block_sizes:
        if set(block_sizes) != {"in_proj", "out_proj"}:
            raise ValueError(f"block_sizes per product takes the keys 'in_proj' and 'out_proj' (one configuration "
                             f"each), got {sorted(block_sizes)}")
        return {name: dict(config) for name, config in block_sizes.items()}
    shared = {k: v for k, v in block_sizes.items() if k != "SPLIT_K"}
    return {"in_proj": shared, "out_proj": dict(shared, SPLIT_K=block_sizes.get("SPLIT_K", 1))}


def _product_launch(kernel, fixed: dict | None, product: str, kind: str, weight: torch.Tensor) -> tuple:
    """(kernel to launch, its meta-parameters): a fixed configuration runs the kernel itself (not its autotuner)."""
    config = fixed[product] if fixed is not None else None
    if config is None and weight.is_cuda:
        config = TUNED_CONFIGS.get(_tuned_key(weight.device, product, kind, weight))
    if config is None:
        return kernel, {}
    config = dict(config)
    if product == "out_proj":
        config.setdefault("SPLIT_K", 1)
    return (kernel.fn if hasattr(kernel, "configs") else kernel), config  # an autotuner's kernel, or the kernel


@dataclass(frozen=True)
class _BlockShape:
    intermediate: int
    conv_dim: int
    heads: int
    head_dim: int
    groups: int
    state: int
    group_size: int
    activation: str
    residual_in_fp32: bool
    norm_eps: float
    gated_eps: float


def _block_shape(language_model) -> _BlockShape:
    config = language_model.config
    mixer = language_model.layers[0].mixer
    intermediate = int(config.expand * config.hidden_size)
    return _BlockShape(
        intermediate=intermediate,
        conv_dim=intermediate + 2 * config.n_groups * config.state_size,
        heads=config.num_heads,
        head_dim=config.head_dim,
        groups=config.n_groups,
        state=config.state_size,
        group_size=hf.gated_norm_group_size(mixer.norm),
        activation=mixer.activation,
        residual_in_fp32=bool(config.residual_in_fp32),
        norm_eps=language_model.layers[0].norm.variance_epsilon,
        gated_eps=mixer.norm.variance_epsilon,
    )


def make_block_step(language_model, kernels: tuple | None = None):
    """One `Mamba2Block` of `language_model` (a transformers `Mamba2Model`) on one token, states updated in place.

    The same arithmetic as `Mamba2Block.forward` + `Mamba2Mixer.forward`'s single-token branch (transformers 5.x),
    written as a function of tensors so that one compiled graph serves every layer. It takes the previous block's
    residual stream and mixer output separately and returns its own, so that the residual add of one layer and the
    RMSNorm of the next land in one fused kernel."""
    shape = _block_shape(language_model)
    conv_update, state_update, _ = decode_kernels() if kernels is None else kernels
    s = shape

    def linear(x, weight, bias):
        # one row (batch 1, one token): the Triton matrix-vector kernel when there is one; the trace is specialised
        # per batch size, so this choice is made once per compiled graph
        gemv = decode_gemv() if (x.shape[0] == 1 and x.is_cuda) else None
        return gemv(x, weight, bias) if gemv is not None else F.linear(x, weight, bias)

    def block_step(residual, out, conv_state, ssm_state, norm_w, in_w, in_b, conv_w, conv_b, dt_bias, A_log, D,
                   gated_w, out_w, out_b):
        hidden = residual + out  # the previous block's output (Mamba2Block: residual + mixer output)
        residual = hidden.float() if s.residual_in_fp32 else hidden
        # Mamba2RMSNorm
        x = hidden.to(norm_w.dtype)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + s.norm_eps)
        x = norm_w * xf.to(x.dtype)
        batch = x.shape[0]
        # Mamba2Mixer, one token against the cached conv and SSM states
        projected = linear(x, in_w, in_b)
        gate, xBC, dt = projected.split([s.intermediate, s.conv_dim, s.heads], dim=-1)
        xBC = conv_update(xBC.transpose(1, 2), conv_state, conv_w.squeeze(1), conv_b, s.activation).transpose(1, 2)
        xs, B, C = xBC.split([s.intermediate, s.groups * s.state, s.groups * s.state], dim=-1)
        A = -torch.exp(A_log.float())
        y = state_update(
            ssm_state,
            xs.view(batch, s.heads, s.head_dim),
            dt.view(batch, s.heads),
            A,
            B.view(batch, s.groups, s.state),
            C.view(batch, s.groups, s.state),
            D,
            dt_bias,
        ).view(batch, 1, -1)
        # MambaRMSNormGated (gate before the norm)
        yf = y.float() * F.silu(gate.float())
        yg = yf.view(batch, 1, -1, s.group_size)
        yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + s.gated_eps)
        y = gated_w * yg.view(batch, 1, -1).to(y.dtype)
        return residual, linear(y.to(x.dtype), out_w, out_b)

    return block_step


def reads_plain_weights(model) -> bool:
    """Whether the decode step's per-layer functions, which read each layer's weight tensors directly, compute what
    the model's modules compute: true when the LM's projections, convolutions and norms and the LM head are the plain
    torch / transformers modules. False once PEFT wraps a layer with an unmerged adapter (its `.weight` is the base
    weight), or a quantisation library replaces a Linear: `generate()` then takes transformers' own path. False for
    an LM other than transformers' `Mamba2Model` (a Cobra-style Mamba-1 LM): the step is Mamba-2's."""
    lm = model.model.language_model
    if type(lm) is not hf.Mamba2Model:
        return False
    plain = [(model.lm_head, torch.nn.Linear), (lm.norm_f, hf.Mamba2RMSNorm)]
    for layer in lm.layers:
        mixer = layer.mixer
        plain += [(layer.norm, hf.Mamba2RMSNorm), (mixer.in_proj, torch.nn.Linear),
                  (mixer.conv1d, torch.nn.Conv1d), (mixer.norm, hf.MambaGatedRMSNorm),
                  (mixer.out_proj, torch.nn.Linear)]
    return all(type(module) is cls for module, cls in plain)


# ---- generate()'s stop check without a host-device round trip per token ---------------------------------------------
def allow_deferred_stop_checks() -> bool:
    """Let `generate()` defer its per-token stop check by one step for the fast path's caches.

    transformers (5.2x) reads `unfinished_sequences.max() == 0` on the host after every token, which makes the host
    wait for the device each step: the generation loop's own host work (≈0.7 ms per token on an H100 host) then adds
    to every decode step instead of overlapping it. Its `DeferredStopCheck` (the same loop, the flag read one step
    late, one extra step undone at the end) removes the stall but is switched on for MPS only. We widen
    `DeferredStopCheck.is_supported` to caches that carry `_mlmamba_defer_stop_check` (the runner's static state
    caches), when the cache is not handed back to the caller; every other cache gets transformers' own answer.
    Returns False when this transformers has no `DeferredStopCheck`."""
    check = hf.deferred_stop_check()
    if check is None:
        return False
    original = check.__dict__["is_supported"]
    original = original.__func__ if isinstance(original, staticmethod) else original
    if getattr(original, "_mlmamba_widened", False):
        return True

    def is_supported(device, cache, cache_is_returned, is_assistant=False):
        if getattr(cache, "_mlmamba_defer_stop_check", False) and not cache_is_returned and not is_assistant:
            return True
        return original(device, cache, cache_is_returned, is_assistant=is_assistant)

    is_supported._mlmamba_widened = True
    check.is_supported = staticmethod(is_supported)
    return True


@contextlib.contextmanager
def _capture_into(graph: torch.cuda.CUDAGraph, pool):
    """`torch.cuda.graph(graph, pool=pool)` with Python's garbage collector held off: a collection during the capture
    can free an unreferenced graph of an earlier runner (a reference cycle through its cache), and freeing CUDA memory
    or destroying a graph while a stream is capturing invalidates the capture."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            yield
    finally:
        if enabled:
            gc.enable()


PREFILL_CHUNK_TOKENS = 4096  # the prefill ladder's chunks hold at most this many tokens (chunk × batch)


def prefill_chunk_limit(batch_size: int) -> int:
    """The longest chunk of the prefill ladder for `batch_size` sequences (a power of two), or 0 when the ladder is off
    (the default). MLMAMBA_PREFILL_CHUNK=N turns it on, with chunks of up to N tokens (rounded down to a power of two;
    512 is a good choice); larger batches get shorter chunks so that one chunk holds at most PREFILL_CHUNK_TOKENS
    tokens. Off by default: measured on an H100 (docs/benchmarks.md), a chunk replay costs ~6 ms however short (the
    prefill's ~2,000 kernels), so a prompt through the ladder takes 1.2-1.7x its own graph's time, and
    capturing the ladder adds ~13-55 s to a batch size's first call; it pays where prompt lengths rarely repeat, at
    batch 1 (a new length: ~45 ms instead of ~200 ms eagerly)."""
    value = os.environ.get("MLMAMBA_PREFILL_CHUNK", "0")
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"MLMAMBA_PREFILL_CHUNK must be a whole number of tokens (0: off), got {value!r}") from None
    if limit <= 0:
        return 0
    limit = min(limit, max(1, PREFILL_CHUNK_TOKENS // max(1, batch_size)))
    return 1 << (limit.bit_length() - 1)


def prefill_chunks(length: int, limit: int) -> list[int]:
    """`length` tokens as chunk lengths of the prefill ladder (the powers of two up to `limit`, itself one), longest
    first: as many chunks of `limit` as fit, then the binary digits of the rest (749, limit 512: 512, 128, 64, 32, 8,
    4, 1)."""
    if length < 0 or limit < 1 or limit & (limit - 1):
        raise ValueError(f"prefill_chunks takes a length >= 0 and a power-of-two limit, got {length} and {limit}")
    chunks = [limit] * (length // limit)
    rest = length % limit
    chunks += [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]
    return chunks


class ShapeGraphs:
    """CUDA graphs of one tensor function, one per input shape, for work whose host time exceeds its GPU time.

    The prefill of the released model launches ~2,000 kernels through Python (mamba_ssm's chunked scan alone costs
    ~1.2 ms of host time per call for ~60 µs of GPU work), so eagerly it runs ~8× longer than its kernels. A graph
    replays them in one launch. Capturing costs about two eager runs (a warm-up for Triton's autotuning, then the
    capture), so a shape is captured the second time it comes, never for a one-off prompt; at most `limit` shapes
    are kept (least recently used dropped). All graphs share one memory pool: they never run concurrently.

    `fn(*inputs)` takes and returns tensors. `mutated(*inputs)` lists the tensors it updates in place (the warm-up
    run's updates are undone); `before(*inputs)` is called before the warm-up and before the capture (to reset
    Python-side bookkeeping that the warm-up changed). Returns None when the shape was not captured: the caller then runs
    its eager code. `limit=None` keeps every graph; `prepare(*inputs)` captures a shape ahead of its first call.
    `pool()` gives a memory pool to share with other ShapeGraphs whose graphs never run concurrently with these (each
    replay's outputs must then be copied out before any other replay)."""

    def __init__(self, fn, mutated=None, before=None, limit: int | None = 4, pool=None):
        self.fn, self.mutated, self.before, self.limit = fn, mutated, before, limit
        self.shared_pool = pool  # a callable giving the memory pool to capture into (shared with other ShapeGraphs)
        self.graphs: dict = {}  # key → (graph, static inputs, static outputs), in least-recently-used order
        self.seen: dict = {}
        self.failed: set = set()
        self.pool = None

    @staticmethod
    def key(inputs) -> tuple:
        return tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)

    def __call__(self, *inputs: torch.Tensor):
        key = self.key(inputs)
        entry = self.graphs.pop(key, None)
        if entry is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] < 2 or key in self.failed:  # first sight, or a shape whose capture failed
                return None
            try:
                entry = self._capture(inputs)
            except Exception as error:  # e.g. an op that synchronises with the host: this shape stays eager
                logger.warning_once(f"Capturing a CUDA graph for input shapes {key} failed "
                                    f"({type(error).__name__}: {error}); running it eagerly")
                self.failed.add(key)
                return None
            self._keep(key, entry)
        self.graphs[key] = entry  # most recently used last
        return self._replay(entry, inputs)

    def replay(self, *inputs: torch.Tensor, clone: bool = True):
        """Replays the graph of a shape that has one (see `prepare`); `clone=False` hands out the graph's own output
        tensors, which the next replay of that shape overwrites."""
        return self._replay(self.graphs[self.key(inputs)], inputs, clone)

    def prepare(self, *inputs: torch.Tensor) -> bool:
        """Captures the shape of `inputs` now if it has no graph (the values do not matter; `mutated` tensors are put
        back); whether it has one afterwards."""
        key = self.key(inputs)
        if key not in self.graphs and key not in self.failed:
            try:
                self._keep(key, self._capture(inputs))
            except Exception as error:
                logger.warning_once(f"Capturing a CUDA graph for input shapes {key} failed "
                                    f"({type(error).__name__}: {error}); running it eagerly")
                self.failed.add(key)
        return key in self.graphs

    def _keep(self, key, entry) -> None:
        while self.limit is not None and len(self.graphs) >= self.limit:
            self.graphs.pop(next(iter(self.graphs)))
        self.graphs[key] = entry

    @staticmethod
    def _replay(entry, inputs, clone: bool = True):
        graph, static_inputs, static_outputs = entry
        for static, given in zip(static_inputs, inputs):
            static.copy_(given)
        graph.replay()
        # the outputs' memory is overwritten by the next replay: hand out copies
        return tuple(out.clone() for out in static_outputs) if clone else static_outputs

    def _capture(self, inputs):
        static_inputs = tuple(t.clone() for t in inputs)
        mutated = list(self.mutated(*inputs)) if self.mutated is not None else []
        saved = [t.clone() for t in mutated]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton autotuning, cuBLAS workspaces, lazy initialisation
            if self.before is not None:
                self.before(*inputs)
            self.fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        for t, value in zip(mutated, saved):
            t.copy_(value)
        del saved
        if self.pool is None:
            self.pool = self.shared_pool() if self.shared_pool is not None else torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        if self.before is not None:
            self.before(*inputs)
        with _capture_into(graph, self.pool):
            static_outputs = self.fn(*static_inputs)
        return graph, static_inputs, tuple(static_outputs)

    def drop(self, which) -> None:
        """Forgets the graphs (and sightings) of the input keys for which `which(key)` is true."""
        self.graphs = {k: v for k, v in self.graphs.items() if not which(k)}
        self.seen = {k: v for k, v in self.seen.items() if not which(k)}
        if not self.graphs:
            self.pool = None


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
        self.fullgraph = True  # one graph per layer; set to False when that fails, keeping graph breaks
        self.failed_modes: set[str] = set()  # compile modes that failed here: not tried again
        self._block = None
        self._fused = None  # the fused layer: unresolved (None), absent (False) or the function
        # the largest batch that takes the fused layer: FUSED_MAX_ROWS where TUNED_CONFIGS has its tensor-core
        # kernels for this GPU and these shapes (measured faster than the compiled layer there), 1 elsewhere (the
        # autotuner's choice was slower); MLMAMBA_FUSED_DECODE_MAX_BATCH sets it
        chosen = os.environ.get("MLMAMBA_FUSED_DECODE_MAX_BATCH")
        if chosen is None:
            lm = model.model.language_model
            tuned = has_tuned_configs(lm, "rows", lm.layers[0].mixer.in_proj.weight.device)
            chosen = FUSED_MAX_ROWS if tuned else 1
        self.fused_max_batch = min(int(chosen), FUSED_MAX_ROWS)
        # prefill: the LM's prompt pass and the towers + connector, each captured per input shape (see ShapeGraphs)
        self.prefill_pool = None
        self.prefill_graphs = ShapeGraphs(
            self._lm_prefill, mutated=self._prefill_states, before=self._mark_empty, limit=4, pool=self._prefill_pool
        )
        self.image_graphs = ShapeGraphs(lambda pixels: (model.model.get_image_features(pixels),), limit=2)
        # ... and for prompt lengths not seen before, the ladder of chunk graphs (captured with each batch size's cache)
        self.chunk_graphs = ShapeGraphs(self._lm_prefill, before=self._mark_continuing, limit=None,
                                        pool=self._prefill_pool)
        self.chunk_limits: dict[int, int] = {}  # batch size → the longest chunk its ladder holds (all shorter ones too)
        allow_deferred_stop_checks()

    def _prefill_pool(self):
        # one memory pool for the LM's prefill graphs (seen shapes and the chunk ladder): they run one at a time
        if self.prefill_pool is None:
            self.prefill_pool = torch.cuda.graph_pool_handle()
        return self.prefill_pool

    def set_compile_mode(self, compile_mode: str | None) -> None:
        if compile_mode in self.failed_modes:
            compile_mode = None
        if compile_mode != self.compile_mode:
            self.compile_mode, self.fullgraph, self._block, self.graphs = compile_mode, True, None, {}

    def _fall_back(self, *, fullgraph: bool) -> None:
        """After a failed compilation: retry with graph breaks (fullgraph=False) or without compiling."""
        if not fullgraph:
            self.fullgraph = False
        else:
            self.failed_modes.add(self.compile_mode)
            self.compile_mode = None
        self._block, self.graphs = None, {}

    # ---- the step that is captured ------------------------------------------------------------------------------
    def _block_fn(self):
        """The per-layer decode function (compiled once, shared by all layers: they have the same shapes)."""
        if self._block is None:
            block = make_block_step(self.model.model.language_model)
            if self.compile_mode is not None:
                block = torch.compile(block, mode=self.compile_mode, fullgraph=self.fullgraph, dynamic=False)
            self._block = block
        return self._block

    def _fused_fn(self):
        """The layer as three Triton kernels (`make_fused_block_step`), or None where there are none."""
        if self._fused is None:
            # MLMAMBA_FUSED_DECODE=0: every batch size runs the compiled layer
            lm = self.model.model.language_model
            enabled = os.environ.get("MLMAMBA_FUSED_DECODE", "1") != "0" and all(  # the kernels stream weight rows
                w.stride(-1) == 1 and w.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for layer in lm.layers for w in (layer.mixer.in_proj.weight, layer.mixer.out_proj.weight)
            )
            self._fused = (enabled and make_fused_block_step(lm)) or False
        return self._fused or None

    def _step(self, input_ids: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """input_ids: (batch, 1) → float32 logits (batch, 1, vocab); updates `cache` in place.

        The text-only decode step of `MLMambaForConditionalGeneration.forward`, i.e. `Mamba2Model` on one token,
        layer by layer. A generated `<image>` id (it lies inside the LM's vocabulary) is embedded as id 0, as the
        model's forward does for placeholders without pixel values."""
        model, lm = self.model, self.model.model.language_model
        batch_size = input_ids.shape[0]
        block = (self._fused_fn() if batch_size <= self.fused_max_batch else None) or self._block_fn()
        input_ids = input_ids.masked_fill(input_ids == model.config.image_token_id, 0)
        hidden = lm.embeddings(input_ids)
        residual = hidden.float() if lm.config.residual_in_fp32 else hidden
        out = torch.zeros_like(hidden)  # layer 0 adds nothing to its input
        layers = lm.layers
        # the fused layer writes the SSM states back every K steps (DeferredUpdates), where the cache has buffers
        pending = getattr(cache, "_mlmamba_pending", None) if block is self._fused else None
        for index, (layer, states) in enumerate(zip(layers, cache.layers)):
            mixer = layer.mixer
            # the fused layer forms the next layer's normalised input in its last kernel (ChainedInput)
            chain = {} if not getattr(block, "chains_layers", False) else dict(
                next_norm_w=layers[index + 1].norm.weight if index + 1 < len(layers) else None)
            if pending is not None:
                chain["pending"] = pending.layer(index)
            residual, out = block(
                residual, out, *hf.layer_states(states), layer.norm.weight,
                mixer.in_proj.weight, mixer.in_proj.bias, mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias,
                mixer.A_log, mixer.D, mixer.norm.weight, mixer.out_proj.weight, mixer.out_proj.bias, **chain,
            )
        if pending is not None:
            pending.count.add_(1)
        with fused_norms(lm, norms=[lm.norm_f]):  # one kernel where mamba_ssm is installed
            hidden = lm.norm_f(residual + out).to(model.lm_head.weight.dtype)
        gemv = decode_gemv() if batch_size == 1 and hidden.is_cuda else None
        head = model.lm_head
        logits = gemv(hidden, head.weight, head.bias) if gemv is not None else head(hidden)
        return logits.float()

    # ---- prefill ------------------------------------------------------------------------------------------------
    def _lm_prefill(self, inputs_embeds: torch.Tensor) -> tuple[torch.Tensor]:
        cache = self.caches[inputs_embeds.shape[0]]
        lm = self.model.model.language_model
        with fused_norms(lm):
            out = lm(inputs_embeds=inputs_embeds, use_cache=True, return_dict=True, **{hf.CACHE_NAME: cache})
        return (out.last_hidden_state,)

    def _prefill_states(self, inputs_embeds: torch.Tensor) -> list[torch.Tensor]:
        cache = self.caches[inputs_embeds.shape[0]]
        return [t for layer in cache.layers for t in hf.layer_states(layer)]

    def _mark_empty(self, inputs_embeds: torch.Tensor) -> None:
        for layer in self.caches[inputs_embeds.shape[0]].layers:
            hf.set_has_previous_state(layer, False)

    def _mark_continuing(self, inputs_embeds: torch.Tensor) -> None:
        # a chunk continues the cache's states (zero before the first chunk, which then computes what a prefill does):
        # transformers' Mamba-2 prepends the conv state and starts the scan from the SSM state
        for layer in self.caches[inputs_embeds.shape[0]].layers:
            hf.set_has_previous_state(layer, True)

    def _capture_chunk_ladder(self, batch_size: int) -> None:
        """Captures the LM's prefill of chunks of 1, 2, 4, ... `prefill_chunk_limit(batch_size)` tokens into the (just
        allocated, not yet live) cache of `batch_size` rows; the cache is reset afterwards by the caller."""
        limit = prefill_chunk_limit(batch_size)
        if not limit or self.model.device.type != "cuda":
            return
        lm = self.model.model.language_model
        embeds = torch.zeros(batch_size, limit, lm.config.hidden_size, device=self.model.device,
                             dtype=lm.embeddings.weight.dtype)
        longest = 0
        with torch.no_grad():
            for bit in range(limit.bit_length()):
                if not self.chunk_graphs.prepare(embeds[:, : 1 << bit]):
                    break
                longest = 1 << bit
        if longest:
            self.chunk_limits[batch_size] = longest

    def _chunked_prefill(self, inputs_embeds: torch.Tensor) -> torch.Tensor | None:
        """The LM's prefill as replays of the chunk ladder's graphs, each continuing the cache (None: no ladder)."""
        limit = self.chunk_limits.get(inputs_embeds.shape[0], 0)
        if not limit:
            return None
        hidden, start = None, 0
        for size in prefill_chunks(inputs_embeds.shape[1], limit):
            (out,) = self.chunk_graphs.replay(inputs_embeds[:, start:start + size], clone=False)
            if hidden is None:
                hidden = out.new_empty(out.shape[0], inputs_embeds.shape[1], *out.shape[2:])
            # copied out at once: the graphs share their memory pool, so the next replay may overwrite this output
            hidden[:, start:start + size].copy_(out)
            start += size
        return hidden

    def prefill(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor | None:
        """The LM's prefill into one of this runner's empty caches, replayed from the chunk ladder's CUDA graphs (or,
        without a ladder, from a graph of this prompt shape when it was seen before); the LM's last hidden state, or
        None when the caller should run it eagerly (no ladder and a shape's first sight, padding in the mask,
        gradients on)."""
        if (
            torch.is_grad_enabled()
            or inputs_embeds.device.type != "cuda"
            or inputs_embeds.shape[1] < 2
            or self.caches.get(inputs_embeds.shape[0]) is not cache
            or hf.has_previous_state(cache.layers[0])
            or (attention_mask is not None and not bool(attention_mask.all()))
        ):
            return None
        # with a chunk ladder every prompt takes it (a prompt is prefilled the same way whatever came before it);
        # without one (the default, or its capture failed) a prompt shape seen twice gets its own graph
        hidden = self._chunked_prefill(inputs_embeds)
        if hidden is None:
            out = self.prefill_graphs(inputs_embeds)
            if out is None:
                return None
            hidden = out[0]
        for layer in cache.layers:  # what the eager prefill leaves in the cache's bookkeeping
            hf.set_has_previous_state(layer, True)
        return hidden

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """Towers + connector for a prefill, replayed from a CUDA graph when this pixel shape was seen before; None
        when the caller should run them eagerly."""
        if torch.is_grad_enabled() or pixel_values.device.type != "cuda":
            return None
        out = self.image_graphs(pixel_values)
        return None if out is None else out[0]

    def release(self, keep: tuple[int, ...] = ()) -> None:
        """Frees the state caches and graphs of every batch size not in `keep` (a batch-64 state in float32 holds
        ~11 GB for the released model); they are allocated and captured again on next use."""
        for batch_size in [b for b in self.caches if b not in keep]:
            self.caches.pop(batch_size)
            self.graphs.pop(batch_size, None)
        if not self.graphs:
            self.pool = None
        # prefill graphs write into the states of the cache they were captured with
        self.prefill_graphs.drop(lambda key: key[0][0][0] not in self.caches)
        self.chunk_graphs.drop(lambda key: key[0][0][0] not in self.caches)
        self.chunk_limits = {b: limit for b, limit in self.chunk_limits.items() if b in self.caches}
        if not self.prefill_graphs.graphs and not self.chunk_graphs.graphs:
            self.prefill_pool = None

    # ---- the cache --------------------------------------------------------------------------------------------
    @property
    def state_dtype(self) -> torch.dtype:
        """The SSM state's dtype: config.ssm_state_dtype, "auto" (or unset) meaning the LM's own dtype (as mamba_ssm's
        Mamba-2 and the original code allocate it)."""
        name = getattr(self.model.config, "ssm_state_dtype", None) or "auto"
        return self.model.lm_head.weight.dtype if name == "auto" else getattr(torch, name)

    def cache_for(self, batch_size: int) -> StaticCache:
        """The cache for `batch_size` rows: allocated on first use, then reset and reused, so that its conv / SSM
        states keep the addresses the captured graph replays against."""
        cache = self.caches.get(batch_size)
        if cache is not None and hf.layer_states(cache.layers[0])[1].dtype != self.state_dtype:
            self.release(keep=tuple(b for b in self.caches if b != batch_size))  # config.ssm_state_dtype changed
            cache = None
        if cache is None:
            cache = self._allocate(batch_size)
            self.caches[batch_size] = cache
            self._capture_chunk_ladder(batch_size)  # runs the LM on the new cache's states: reset below
        cache.reset()  # zeroes the states in place and marks them empty: the next forward is a prefill
        pending = getattr(cache, "_mlmamba_pending", None)
        if pending is not None:
            pending.reset()
        return cache

    def settle(self, cache) -> None:
        """Puts the decode steps that the fused layer has not yet written into the SSM states of this runner's
        `cache` (`DeferredUpdates`) into them, so that the cache holds the true states: before anything but the
        captured step reads it (an eager forward, the caller of `generate()` that gets it back)."""
        pending = getattr(cache, "_mlmamba_pending", None)
        if pending is not None and pending.pending:
            pending.fold([hf.layer_states(layer)[1] for layer in cache.layers],
                         [layer.mixer.A_log for layer in self.model.model.language_model.layers])

    def defers_state_writes(self, batch_size: int) -> bool:
        """Whether the decode step of `batch_size` sequences writes the SSM states back every K steps only
        (`DeferredUpdates`): see `defer_state_writes`; on CUDA, where the fused layer runs."""
        return (self.model.device.type == "cuda"
                and defer_state_writes(batch_size, self.fused_max_batch)
                and self._fused_fn() is not None)

    def _allocate(self, batch_size: int) -> StaticCache:
        text_config = self.model.config.text_config
        cache = hf.static_state_cache(text_config)
        device, dtype = self.model.device, self.model.lm_head.weight.dtype
        num_heads, head_dim, state = text_config.num_heads, text_config.head_dim, text_config.state_size
        conv_dim = int(text_config.expand * text_config.hidden_size) + 2 * text_config.n_groups * state
        for layer in cache.layers:
            # conv state in the activations' dtype; SSM state in config.ssm_state_dtype (the LM's dtype by default;
            # the prefill's final state, float32 from the chunked scan, is cast into it)
            hf.allocate_layer_states(
                layer,
                torch.zeros(batch_size, conv_dim, text_config.conv_kernel, device=device, dtype=dtype),
                torch.zeros(batch_size, num_heads, head_dim, state, device=device, dtype=self.state_dtype),
            )
        if self.defers_state_writes(batch_size):
            cache._mlmamba_pending = PendingSteps(
                len(cache.layers), batch_size, deferred_steps(batch_size), _block_shape(self.model.model.language_model),
                dtype, device)
        cache._mlmamba_defer_stop_check = True  # see allow_deferred_stop_checks
        cache._mlmamba_runner = self  # MLMambaModel.forward finds the prefill graphs through the cache
        return cache

    @torch.no_grad()
    def _capture(self, batch_size: int, cache: StaticCache) -> None:
        """Compile (on first use), warm up and capture the decode step over `cache`, whose states hold a live
        prefill: they are saved before and put back after, since warm-up and capture run the step."""
        saved = self._save(cache)
        try:
            try:
                self._warm_up_and_capture(batch_size, cache)
            except Exception as error:  # torch.compile could not take the whole layer as one graph
                if self.compile_mode is None or not self.fullgraph:
                    raise
                logger.warning(f"Compiling the decode step as one graph failed ({type(error).__name__}: {error}); "
                               "compiling it with graph breaks")
                self._fall_back(fullgraph=False)
                self._restore(cache, saved)
                self._warm_up_and_capture(batch_size, cache)
        except Exception as error:  # nor in pieces: capture the eager kernels instead
            if self.compile_mode is None:
                raise
            logger.warning(f"Compiling the decode step failed ({type(error).__name__}: {error}); capturing it eagerly")
            self._fall_back(fullgraph=True)
            self._restore(cache, saved)
            self._warm_up_and_capture(batch_size, cache)
        finally:
            self._restore(cache, saved)

    @staticmethod
    def _save(cache: StaticCache) -> tuple:
        """Copies of what running the decode step changes in `cache`: its states and its pending steps (if any)."""
        pending = getattr(cache, "_mlmamba_pending", None)
        return ([tuple(t.clone() for t in hf.layer_states(layer)) for layer in cache.layers],
                pending.snapshot() if pending is not None else None)

    @staticmethod
    def _restore(cache: StaticCache, saved: tuple) -> None:
        states, pending = saved
        for layer, (conv, ssm) in zip(cache.layers, states):
            conv_state, ssm_state = hf.layer_states(layer)
            conv_state.copy_(conv)
            ssm_state.copy_(ssm)
        if pending is not None:
            cache._mlmamba_pending.restore(pending)

    def _warm_up_and_capture(self, batch_size: int, cache: StaticCache) -> None:
        static_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=self.model.device)
        step = self._step
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
        with _capture_into(graph, self.pool):
            static_logits = step(static_ids, cache)
        self.graphs[batch_size] = (graph, static_ids, static_logits, cache)

    # ---- what generate() calls for every decode step ------------------------------------------------------------
    def __call__(self, **model_inputs):
        input_ids = model_inputs.get("input_ids")
        cache = model_inputs.get(hf.CACHE_NAME)
        replayable = (
            input_ids is not None
            and input_ids.shape[1] == 1
            and cache is not None
            and self.caches.get(input_ids.shape[0]) is cache
            and hf.has_previous_state(cache.layers[0])
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
        pending = getattr(cache, "_mlmamba_pending", None)
        if pending is not None:
            pending.steps += 1  # the host's count of the steps the graph has taken (it counts them on the device)
        # generate() copies the last position's logits before the next replay overwrites them
        return self.output_class(logits=static_logits, **{hf.CACHE_NAME: cache})
