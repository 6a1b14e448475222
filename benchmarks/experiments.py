#!/usr/bin/env python
"""Measurements behind the fast path's design choices, on one GPU (released shapes, random bf16 weights).

  --part prefill   host time per call of each piece of one LM layer's prefill (transformers' Mamba-2 block,
                   its in_proj / conv / chunked scan / gated norm / out_proj, mamba_ssm's fused alternatives), and
                   the whole LM prefill with the fast path's cache: where the prefill's host time goes.
  --part gemv      batch-1 matrix-vector products: cuBLAS against the Triton kernel of the decode step.
  --part kernels   the kernels of one decode step (as captured: fused layer or compiled layer) at each of --batches
                   and --state-dtypes, run eagerly under the profiler, by GPU time; the fused kernels launched
                   one after the other (MLMAMBA_PDL=0), so that each kernel's time is its own.
  --part sweep     launch configurations of the fused layer's two products, each timed in the captured step (all
                   64 layers in one CUDA graph, as generate() replays it): matrix-vector kernels at batch 1, the
                   16-row tensor-core kernels at the --batches above 1,
                   for the SSM state dtypes of --state-dtypes; one product's candidates with the other fixed, then
                   the other's with the first's best. Prints TUNED_CONFIGS entries for generation_mlmamba.py.
  --part rows      the 16-row product kernels of the fused layer (batches 2-16) alone, at each of --batches: each
                   candidate configuration launched for the 64 layers' distinct weights one by one, µs per call from
                   the profiler and the weight bytes over it; in_proj as in the step and with its input already
                   normalised (NORMED: what the previous layer's out_proj can hand over), out_proj.
  --part skinny    how the 16-row products' weight tiles are best read, on a bare product (W · xᵀ over --batches
                   rows, split over K, partial sums stored; nothing else in the kernel): pointer loads through
                   Triton's software pipelining (cp.async) against tensor-memory-accelerator descriptors (TMA), with
                   and without warp specialisation; in_proj's and out_proj's shapes, µs per call and TB/s.
  --part ssm       the fused layer's SSM update (ssm_step_gate) alone at each of --batches and --state-dtypes, for
                   head-dim rows per program (BLOCK_P) and warps: µs per call over the 64 layers' distinct states
                   (one by one, from the profiler) and the state bytes read and written over it.
  --part timeline  one captured decode step at each of --batches above 1 and --state-dtypes with each program of the
                   fused layer's kernels stamping %globaltimer when it starts, when its inputs are ready (past the
                   programmatic launch's wait) and when it is done: per kernel, those times from the previous kernel's
                   last program done (mean over the layers), i.e. where the step's time goes between the kernels.
  --part decode    the captured decode step's GPU time per replay at several batch sizes for variants of the step:
                   SSM state in float32 or bfloat16, batch 1 as three fused Triton kernels per layer or as the
                   compiled layer, causal_conv1d's kernel or inductor's code for the conv update, inductor's default
                   or max-autotune mode.

  --part ladder    the LM prefill's chunk ladder at each of --batches: the time to capture it, each chunk graph's
                   GPU time per replay, a --tokens prompt through the ladder against its own whole-prompt graph,
                   and the kernels (by GPU time, run eagerly under the profiler) of a whole 512-token prefill
                   against a 512-token chunk continuing the cache.

  python benchmarks/experiments.py --part prefill,decode [--tokens 800] [--batches 1,8,64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from generation import build, copy_bandwidth, replay_ms  # noqa: E402
from transformers import CompileConfig  # noqa: E402

from modeling_mlmamba import generation_mlmamba  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="prefill,decode")
    p.add_argument("--tokens", type=int, default=800, help="prefill length")
    p.add_argument("--batches", default="1,8,64", help="decode batch sizes")
    p.add_argument("--variants", default="fp32-unfused,fp32,bf16",
                   help="comma-separated: fp32 / bf16 state, with -unfused (batch 1 runs the compiled layer, not the "
                        "three fused kernels), -nopdl (fused kernels launched one after the other), -late (the next "
                        "kernel launched once this one waited, not once it started), -rows / -norows "
                        "(the fused layer up to batch 16 / at batch 1 only; by default: up to 16 where TUNED_CONFIGS "
                        "has its kernels), -cublas (no Triton GEMV), -torch-conv, -max-autotune")
    p.add_argument("--env", default="", help="--part decode / timeline: ';'-separated sets of space-separated "
                   "NAME=VALUE environment settings, each run with every variant, e.g. --env='-;MLMAMBA_PDL_IN=0;"
                   "MLMAMBA_PDL_EARLY=0' (see generation_mlmamba.py; '-': none)")
    p.add_argument("--skinny", default="ptr,tma", help="--part skinny's ways of reading the weight: ptr (cp.async), "
                   "tma, tma-ws (warp-specialised)")
    p.add_argument("--state-dtypes", default="float32,bfloat16", help="SSM state dtypes of --part sweep and --part kernels")
    return p.parse_args()


def host_and_wall(fn, n: int = 64) -> tuple[float, float]:
    """µs per call: until the calls return (host), and until the GPU is done (wall)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return 1e6 * (t1 - t0) / n, 1e6 * (t2 - t0) / n


def gpu_us(fn, n: int = 20) -> float:
    """µs of GPU time per call, from the profiler's kernel times."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / n


def prefill_parts(model, tokens: int):
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined

    lm = model.model.language_model
    layer = lm.layers[0]
    m = layer.mixer
    c = lm.config
    d_inner, conv_dim = m.intermediate_size, m.conv_dim
    hidden = torch.randn(1, tokens, c.hidden_size, device="cuda", dtype=torch.bfloat16)
    runner = model._decode_graph_runner()
    cache = runner.cache_for(1)
    zxbcdt = m.in_proj(hidden)
    gate, xBC, dt = zxbcdt.split([d_inner, conv_dim, m.num_heads], dim=-1)
    xBC_t = xBC.transpose(1, 2)
    conv_out = causal_conv1d_fn(xBC_t, m.conv1d.weight.squeeze(1), m.conv1d.bias, activation="silu").transpose(1, 2)
    xs, B, C = conv_out.split([d_inner, c.n_groups * c.state_size, c.n_groups * c.state_size], dim=-1)
    A = -torch.exp(m.A_log.float())
    y = torch.randn(1, tokens, d_inner, device="cuda", dtype=torch.bfloat16)
    x4 = xs.reshape(1, tokens, m.num_heads, m.head_dim)
    B4, C4 = B.reshape(1, tokens, c.n_groups, -1), C.reshape(1, tokens, c.n_groups, -1)

    def lm_prefill():
        cache.reset()
        lm(inputs_embeds=hidden, cache_params=cache, use_cache=True)

    def block():
        cache.layers[0].has_previous_state[0] = False
        layer(hidden, cache_params=cache)

    rows = [
        ("LM prefill, 64 layers (transformers' Mamba2Model, fast-path cache)", lm_prefill, 4),
        ("one Mamba2Block (transformers) with cache", block, 64),
        ("  Mamba2RMSNorm", lambda: layer.norm(hidden), 64),
        ("  in_proj", lambda: m.in_proj(hidden), 64),
        ("  causal_conv1d_fn", lambda: causal_conv1d_fn(xBC_t, m.conv1d.weight.squeeze(1), m.conv1d.bias,
                                                        activation="silu"), 64),
        ("  mamba_chunk_scan_combined (final state)", lambda: mamba_chunk_scan_combined(
            x4, dt, A, B4, C4, m.chunk_size, D=m.D, dt_bias=m.dt_bias, dt_softplus=True,
            return_final_states=True), 64),
        ("  MambaRMSNormGated (transformers)", lambda: m.norm(y, gate), 64),
        ("  out_proj", lambda: m.out_proj(y), 64),
        ("  mamba_ssm rms_norm_fn (add + norm, Triton)", lambda: rms_norm_fn(
            hidden, layer.norm.weight, None, residual=hidden, eps=1e-5, prenorm=True, residual_in_fp32=True), 64),
        ("  mamba_ssm rmsnorm_fn (gated, Triton)", lambda: rmsnorm_fn(
            y, m.norm.weight, None, z=gate, eps=1e-5, group_size=m.norm.group_size, norm_before_gate=False), 64),
        ("  mamba_split_conv1d_scan_combined (conv+scan+norm+out_proj)", lambda: mamba_split_conv1d_scan_combined(
            zxbcdt, m.conv1d.weight.squeeze(1), m.conv1d.bias, m.dt_bias, A, m.D, m.chunk_size,
            return_final_states=True, rmsnorm_weight=m.norm.weight, rmsnorm_eps=1e-5, outproj_weight=m.out_proj.weight,
            outproj_bias=None, headdim=m.head_dim, ngroups=m.n_groups, norm_before_gate=False), 64),
    ]
    print(f"\n===== prefill pieces, batch 1 × {tokens} tokens (µs per call)")
    print("| piece | host | wall | GPU |\n|---|---:|---:|---:|")
    with torch.no_grad():
        for name, fn, n in rows:
            host, wall = host_and_wall(fn, n)
            gpu = gpu_us(fn, min(n, 8))
            print(f"| {name} | {host:.0f} | {wall:.0f} | {gpu:.0f} |", flush=True)


def _env_sets(text: str) -> list[dict]:
    """--env's sets of settings: [{name: value}], [{}] for none."""
    sets = []
    for part in text.split(";"):
        if part.strip():
            sets.append(dict(item.split("=", 1) for item in part.split() if item != "-"))
    return sets or [{}]


def decode_variants(model, batches: list[int], variants: list[str], env_sets: list[dict]):
    from generation import TEXT_TOKENS, Spec, random_image

    spec = Spec("mlmamba", model)
    pixel_values = spec.preprocess([random_image()]).to("cuda", torch.bfloat16)
    default_kernels = generation_mlmamba.decode_kernels()
    torch_conv = (generation_mlmamba._torch_conv_update, default_kernels[1], ("torch", default_kernels[2][1]))
    print(f"\n===== decode step per graph replay (ms), kernels by default: {default_kernels[2]}")
    print("| variant | " + " | ".join(f"b{b}" for b in batches) + " | first capture (s) |")
    print("|---|" + "---:|" * (len(batches) + 1))
    gemv = generation_mlmamba.decode_gemv()
    for variant, env in [(v, e) for v in variants for e in env_sets]:
        os.environ.update(env)  # read by each new runner's fused layer
        generation_mlmamba._KERNELS = torch_conv if "torch-conv" in variant else default_kernels
        generation_mlmamba._GEMV[:] = [None if "cublas" in variant else gemv]
        os.environ["MLMAMBA_FUSED_DECODE"] = "0" if "unfused" in variant else "1"  # read by each new runner
        os.environ["MLMAMBA_PDL"] = "0" if "nopdl" in variant else "1"
        os.environ["MLMAMBA_PDL_EARLY"] = "0" if "late" in variant else "1"
        if "norows" in variant or "rows" in variant:  # else the default (the fused layer up to 16 where tuned)
            os.environ["MLMAMBA_FUSED_DECODE_MAX_BATCH"] = "1" if "norows" in variant else "16"
        else:
            os.environ.pop("MLMAMBA_FUSED_DECODE_MAX_BATCH", None)
        model.config.ssm_state_dtype = "bfloat16" if "bf16" in variant else "float32"
        config = CompileConfig(mode="max-autotune") if "max-autotune" in variant else CompileConfig()
        model._decode_graphs = None
        times, first = [], None
        for b in batches:
            inputs = dict(input_ids=spec.input_ids(b, TEXT_TOKENS, "cuda"),
                          pixel_values=pixel_values.expand(b, -1, -1, -1).contiguous())
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                               cache_implementation="static", compile_config=config)
            torch.cuda.synchronize()
            first = first or time.perf_counter() - t
            times.append(replay_ms(model._decode_graphs.graphs[b][0]))
            model._decode_graphs.release(keep=())
        label = " ".join([variant, *(f"{k}={v}" for k, v in env.items())])
        print(f"| {label} | " + " | ".join(f"{t:.3f}" for t in times) + f" | {first:.0f} |", flush=True)
        for key in env:
            os.environ.pop(key, None)
    generation_mlmamba._KERNELS = default_kernels
    generation_mlmamba._GEMV[:] = [gemv]
    os.environ.pop("MLMAMBA_FUSED_DECODE", None)
    os.environ.pop("MLMAMBA_PDL", None)
    os.environ.pop("MLMAMBA_PDL_EARLY", None)
    os.environ.pop("MLMAMBA_FUSED_DECODE_MAX_BATCH", None)
    model.config.ssm_state_dtype = "auto"  # the default


def step_kernels(model, batch: int = 1, state_dtype: str = "float32"):
    """The kernels of one decode step (run without the graph, profiled, no programmatic dependent launch), by GPU
    time, and the bytes each fused kernel must move per layer over its time."""
    from generation import TEXT_TOKENS, Spec, random_image
    from torch.profiler import ProfilerActivity, profile

    spec = Spec("mlmamba", model)
    pixel_values = spec.preprocess([random_image()]).to("cuda", torch.bfloat16)
    inputs = dict(input_ids=spec.input_ids(batch, TEXT_TOKENS, "cuda"),
                  pixel_values=pixel_values.expand(batch, -1, -1, -1).contiguous())
    model._decode_graphs = None
    model.config.ssm_state_dtype = state_dtype
    os.environ["MLMAMBA_PDL"] = "0"
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                       cache_implementation="static")
        runner = model._decode_graphs
        _, static_ids, _, cache = runner.graphs[batch]
        runner._step(static_ids, cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner._step(static_ids, cache)
            torch.cuda.synchronize()
    found = generation_mlmamba.fused_kernels()
    for kernel in found[1] if found is not None else ():
        if hasattr(kernel, "best_config"):  # autotuned: the configuration it settled on for the released shapes
            print(f"{kernel.fn.__name__}: {kernel.best_config}")
            timings = sorted((t[0] if isinstance(t, (list, tuple)) else t, str(c))
                             for c, t in getattr(kernel, "configs_timings", {}).items())
            for t, c in timings[:6]:  # the autotuner's own timings (one kernel at a time, L2 flushed)
                print(f"    {t * 1e3:8.1f} µs  {c}")
    os.environ.pop("MLMAMBA_PDL")
    model.config.ssm_state_dtype = "auto"  # the default
    runner.release(keep=())
    print(f"\n===== kernels of one decode step, batch {batch}, {state_dtype} state (64 layers, launched one by one)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90))
    # the fused kernels' bytes per layer: weights once, the batch's SSM state read and written, activations
    tc = model.model.language_model.config
    m = model.model.language_model.layers[0].mixer
    state = batch * tc.num_heads * tc.head_dim * tc.state_size * getattr(torch, state_dtype).itemsize * 2
    needed = {"norm_in_proj_conv": m.in_proj.weight.numel() * 2, "ssm_step_gate": state,
              "gated_norm_out_proj": m.out_proj.weight.numel() * 2}
    print("| fused kernel | µs per layer | MB per layer | TB/s |\n|---|---:|---:|---:|")
    for event in prof.key_averages():
        for name, nbytes in needed.items():
            if event.key.startswith(name) and event.count:
                us = event.self_device_time_total / event.count
                print(f"| {event.key} | {us:.1f} | {nbytes / 1e6:.1f} | {nbytes / us / 1e6:.2f} |")


# candidates of --part sweep: meta-parameters of one product's kernel (num_stages only matters with PREFETCH=False,
# where Triton's software pipelining keeps num_stages - 1 weight tiles in flight through shared memory)
def _candidates(rows: list[tuple], **fixed) -> list[dict]:
    names = ("BLOCK_N", "BLOCK_K", "num_warps", *fixed.pop("names", ()))
    return [dict(zip(names, row), **fixed) for row in rows]


MATVEC_IN = _candidates([(32, 256, 4), (16, 256, 4), (64, 128, 8), (16, 512, 4), (8, 512, 4), (32, 128, 4),
                         (16, 256, 2), (32, 128, 2)], num_stages=2)
MATVEC_OUT = _candidates([(4, 1024, 4, 1), (4, 512, 4, 1), (8, 512, 4, 1), (8, 512, 4, 2), (16, 256, 4, 4),
                          (8, 1024, 8, 1), (4, 1024, 8, 1), (8, 1024, 4, 1), (4, 2048, 4, 1), (2, 2048, 4, 1),
                          (4, 1024, 2, 1), (2, 1024, 2, 1)], num_stages=2, names=("SPLIT_K",))
ROWS_IN = _candidates([(64, 64, 4, 6), (64, 64, 4, 8), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 4, 4),
                       (64, 128, 4, 5), (128, 128, 8, 3), (128, 64, 8, 6), (64, 64, 8, 6), (32, 128, 4, 4),
                       (32, 128, 4, 6), (32, 256, 4, 3), (64, 256, 4, 3)], PREFETCH=False, names=("num_stages",))
ROWS_OUT = _candidates([(64, 256, 4, 2, 3), (64, 256, 4, 2, 4), (64, 128, 4, 2, 5), (64, 128, 4, 3, 5),
                        (64, 128, 4, 4, 4), (64, 64, 4, 4, 6), (128, 128, 8, 2, 3), (64, 256, 4, 1, 3),
                        (32, 256, 4, 2, 3), (32, 128, 4, 4, 4), (32, 256, 4, 3, 3), (64, 128, 8, 4, 4)],
                       PREFETCH=False, names=("SPLIT_K", "num_stages"))


def _label(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def sweep(model, batches: list[int], state_dtypes: list[str]):
    """--part sweep (see the module's docstring)."""
    lm = model.model.language_model
    tc = lm.config
    conv_dim = int(tc.expand * tc.hidden_size) + 2 * tc.n_groups * tc.state_size
    raw = generation_mlmamba._fused_kernels(autotune=False)
    weights = [(layer.norm.weight, layer.mixer.in_proj.weight, layer.mixer.in_proj.bias, layer.mixer.conv1d.weight,
                layer.mixer.conv1d.bias, layer.mixer.dt_bias, layer.mixer.A_log, layer.mixer.D,
                layer.mixer.norm.weight, layer.mixer.out_proj.weight, layer.mixer.out_proj.bias)
               for layer in lm.layers]
    in_w, out_w = lm.layers[0].mixer.in_proj.weight, lm.layers[0].mixer.out_proj.weight

    def time_step(batch: int, state_dtype: torch.dtype, block_sizes: dict | None, early: bool = False) -> float:
        """ms per replay of the 64 fused layers captured in one graph (None: the production kernels: TUNED_CONFIGS
        or the autotuner); early: MLMAMBA_PDL_EARLY=1."""
        os.environ["MLMAMBA_PDL_EARLY"] = "1" if early else "0"
        if block_sizes is None:
            block = generation_mlmamba.make_fused_block_step(lm)
        else:
            block = generation_mlmamba.make_fused_block_step(lm, kernels=raw, block_sizes=block_sizes)
        os.environ.pop("MLMAMBA_PDL_EARLY")
        convs = [torch.zeros(batch, conv_dim, tc.conv_kernel, device="cuda", dtype=torch.bfloat16) for _ in weights]
        ssms = [torch.zeros(batch, tc.num_heads, tc.head_dim, tc.state_size, device="cuda", dtype=state_dtype)
                for _ in weights]
        residual = torch.randn(batch, 1, tc.hidden_size, device="cuda") * 0.1
        out = torch.zeros(batch, 1, tc.hidden_size, device="cuda", dtype=torch.bfloat16)

        def step():
            r, o = residual, out
            for i, (w, conv, ssm) in enumerate(zip(weights, convs, ssms)):
                r, o = block(r, o, conv, ssm, *w, next_norm_w=weights[i + 1][0] if i + 1 < len(weights) else None)
            return o

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compiles (and autotunes) outside the capture
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        times = sorted(replay_ms(graph, n=40, warmup=3) for _ in range(3))
        del graph
        return times[1]

    tuned = {}
    for batch in batches:
        rows = batch > 1
        kind = "rows" if rows else "matvec"
        for dtype_name in state_dtypes:
            state_dtype = getattr(torch, dtype_name)
            print(f"\n===== sweep: batch {batch}, {dtype_name} state, ms per replay of the 64 fused layers", flush=True)
            if not rows or any(key[2] == "rows" for key in generation_mlmamba.TUNED_CONFIGS):
                print("production kernels (TUNED_CONFIGS / autotuner), next kernel launched after the wait / early: "
                      + " / ".join(f"{time_step(batch, state_dtype, None, early):.3f}" for early in (False, True)))
            # coordinate descent from TUNED_CONFIGS' entries where there are some (the first candidates otherwise):
            # the products interact through the step, so one product is timed beside the other's best known config
            best = {}
            for product, weight, candidates in (("in_proj", in_w, ROWS_IN if rows else MATVEC_IN),
                                                ("out_proj", out_w, ROWS_OUT if rows else MATVEC_OUT)):
                key = generation_mlmamba._tuned_key(weight.device, product, kind, weight)
                best[product] = dict(generation_mlmamba.TUNED_CONFIGS.get(key, candidates[0]))
            for product, candidates in (("in_proj", ROWS_IN if rows else MATVEC_IN),
                                        ("out_proj", ROWS_OUT if rows else MATVEC_OUT)):
                results = []
                for config in candidates:
                    try:
                        ms = time_step(batch, state_dtype, dict(best, **{product: config}))
                    except Exception as error:  # e.g. out of shared memory for this tile
                        print(f"  {product} {_label(config)}: failed ({type(error).__name__}: {str(error)[:120]})")
                        continue
                    results.append((ms, config))
                    print(f"  {product} {_label(config)}: {ms:.3f}", flush=True)
                # the three fastest once more, in reverse order (a config timed first is not favoured): the best of
                # the two timings decides
                top = sorted(results, key=lambda r: r[0])[:3]
                again = [(min(ms, time_step(batch, state_dtype, dict(best, **{product: config}))), config)
                         for ms, config in reversed(top)]
                again.sort(key=lambda r: r[0])
                best[product] = again[0][1]
                print(f"best {product}: {_label(best[product])} ({again[0][0]:.3f} ms; next "
                      f"{', '.join(f'{ms:.3f}' for ms, _ in again[1:])})", flush=True)
            print("the best of both, next kernel launched after the wait / early: "
                  + " / ".join(f"{time_step(batch, state_dtype, best, early):.3f}" for early in (False, True)))
            for product, weight in (("in_proj", in_w), ("out_proj", out_w)):
                key = generation_mlmamba._tuned_key(weight.device, product, kind, weight)
                tuned.setdefault(key, {})[dtype_name] = best[product]
    print("\n===== TUNED_CONFIGS candidates (per state dtype; the same entry serves both)")
    for key, by_dtype in tuned.items():
        for dtype_name, config in by_dtype.items():
            print(f"    {key!r}: {config!r},  # {dtype_name} state")


def kernel_us(launch, count: int, prefixes: tuple[str, ...]) -> float:
    """µs of GPU time per call of the kernels named `prefixes*`: `launch(i)` for i < count once to compile, then once
    more under the profiler, one by one (each kernel alone on the GPU)."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(count):
        launch(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(count):
            launch(i)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.key.startswith(prefixes)]
    return sum(e.self_device_time_total for e in events) / sum(e.count for e in events)


# --part rows: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, NORMED; "noconv": NORMED without the conv
# update's epilogue, to show its cost; "packed": NORMED with the conv update on 64-bit words, as in the step) of in_proj, and (BLOCK_M, BLOCK_N,
# BLOCK_K, SPLIT_K, num_warps, num_stages, NEXT: forming the next layer's input) of out_proj; all with PREFETCH=False (Triton's software pipelining)
ROWS_IN_ALONE = [(16, 64, 64, 4, 6, False), (16, 64, 64, 4, 6, True), (8, 64, 64, 4, 6, True),
                 (8, 64, 64, 4, 6, "noconv"), (8, 64, 64, 4, 6, "packed"), (8, 64, 128, 4, 4, True),
                 (8, 64, 128, 4, 4, "noconv"), (8, 64, 128, 4, 4, "packed"), (8, 64, 256, 4, 3, "packed"),
                 (8, 32, 128, 4, 5, "packed"), (8, 64, 128, 4, 5, True), (8, 128, 128, 8, 4, True)]
ROWS_OUT_ALONE = [(16, 64, 256, 2, 4, 3, False), (16, 64, 256, 2, 4, 3, True), (16, 64, 128, 2, 4, 5, True),
                  (16, 64, 128, 1, 4, 6, True), (16, 64, 128, 3, 4, 5, True), (16, 128, 64, 4, 8, 6, True)]


def rows_products(model, batches: list[int]):
    """--part rows (see the module's docstring)."""

    lm = model.model.language_model
    tc = lm.config
    s = generation_mlmamba._block_shape(lm)
    triton, kernels = generation_mlmamba._fused_kernels(autotune=False)
    in_kernel, out_kernel = kernels[3], kernels[4]
    layers = [layer.mixer for layer in lm.layers]
    norm_ws = [layer.norm.weight for layer in lm.layers]
    dev, bf16 = "cuda", torch.bfloat16
    k_in, n_in = tc.hidden_size, layers[0].in_proj.weight.shape[0]
    n_out, k_out = layers[0].out_proj.weight.shape
    n_parts = s.heads * triton.cdiv(s.head_dim, generation_mlmamba._SSM_BLOCK_P)
    n_squares = triton.cdiv(n_out, 64)  # out_proj's row blocks of 64: the chained input's sums of squares per row

    def report(label: str, launch, weight_bytes: int) -> None:
        # one table row: µs per call over the layers' distinct weights and the weight bytes over it
        try:
            us = kernel_us(launch, len(layers), ("norm_in_proj", "gated_norm"))
        except Exception as error:
            print(f"| {label} | failed: {type(error).__name__}: {str(error)[:100]} | |")
            return
        print(f"| {label} | {us:.1f} | {weight_bytes / us / 1e6:.2f} |", flush=True)

    for batch in batches:
        residual = torch.randn(batch, k_in, device=dev)
        prev = torch.randn(batch, k_in, device=dev, dtype=bf16)
        normed = torch.randn(batch, k_in, device=dev, dtype=bf16)
        squares = torch.rand(batch, n_squares, device=dev)
        res_out = torch.empty_like(residual)
        projected = torch.empty(batch, n_in, device=dev, dtype=bf16)
        conv = torch.zeros(batch, s.conv_dim, tc.conv_kernel, device=dev, dtype=bf16)
        gated = torch.randn(batch, k_out, device=dev, dtype=bf16)
        parts = torch.rand(batch, n_parts, device=dev)
        out = torch.empty(batch, n_out, device=dev, dtype=bf16)
        split = torch.empty(4, batch, n_out, device=dev)
        count = torch.zeros(n_out, device=dev, dtype=torch.int32)
        print(f"\n===== 16-row products alone, batch {batch}: µs per call (64 layers' weights, one by one)")
        print("| in_proj: BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, NORMED | µs | TB/s |\n|---|---:|---:|")
        for bm, bn, bk, warps, stages, normed_input in ROWS_IN_ALONE:
            def launch(i):
                m = layers[i]
                conv_w = m.conv1d.weight.view(s.conv_dim, -1)
                states = conv
                if normed_input == "packed":
                    states, conv_w = conv.view(torch.int64), conv_w.view(torch.int64)
                in_kernel[(triton.cdiv(n_in, bn),)](
                    normed if normed_input else residual, squares if normed_input else prev, norm_ws[i], res_out,
                    m.in_proj.weight, m.in_proj.weight, projected, states, conv_w, m.conv1d.bias, batch, n_in, k_in,
                    m.in_proj.weight.stride(0), s.intermediate, 0 if normed_input == "noconv" else s.conv_dim,
                    *states.stride(), *conv_w.stride(), s.norm_eps, n_squares, HAS_BIAS=False, HAS_CONV_BIAS=True,
                    SILU=True, D_CONV=tc.conv_kernel, BLOCK_C=triton.next_power_of_2(tc.conv_kernel), IEEE=False,
                    USE_PDL=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PREFETCH=False,
                    NORMED=bool(normed_input), BLOCK_SQUARES=64, PACKED_CONV=normed_input == "packed",
                    num_warps=warps, num_stages=stages)
            report(f"{bm}, {bn}, {bk}, {warps}, {stages}, {normed_input}", launch, n_in * k_in * 2)
        print("| out_proj: BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages, NEXT | µs | TB/s |\n|---|---:|---:|")
        for bm, bn, bk, split_k, warps, stages, next_input in ROWS_OUT_ALONE:
            def launch(i):
                m = layers[i]
                out_kernel[(triton.cdiv(n_out, bn), split_k)](
                    gated, parts, m.out_proj.weight, m.out_proj.weight, out, split, count, residual, res_out,
                    norm_ws[i], squares, batch, n_out, k_out,
                    m.out_proj.weight.stride(0), n_parts, n_parts // s.groups, s.group_size, s.gated_eps,
                    HAS_BIAS=False, BLOCK_G=triton.next_power_of_2(s.groups),
                    BLOCK_PARTS=triton.next_power_of_2(n_parts), IEEE=False, USE_PDL=False, SPLIT_K=split_k,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PREFETCH=False, NEXT=next_input, num_warps=warps,
                    num_stages=stages)
            report(f"{bm}, {bn}, {bk}, {split_k}, {warps}, {stages}, {next_input}", launch, n_out * k_out * 2)


def _skinny_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def skinny_ptr(x_ptr, w_ptr, out_ptr, M, N, K, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        pid, pid_k = tl.program_id(0), tl.program_id(1)
        m = tl.arange(0, BLOCK_M)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        k_len = K // SPLIT_K
        for k0 in range(pid_k * k_len, (pid_k + 1) * k_len, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=(rows < N)[:, None], other=0.0,
                        eviction_policy="evict_first")
            x = tl.load(x_ptr + m[:, None] * K + cols[None, :], mask=(m < M)[:, None], other=0.0)
            acc = tl.dot(w, tl.trans(x), acc)
        out = tl.trans(acc)
        tl.store(out_ptr + pid_k * M * N + m[:, None] * N + rows[None, :], out,
                 mask=(m < M)[:, None] & (rows < N)[None, :])

    @triton.jit
    def skinny_tma(x_desc, w_desc, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, WS: tl.constexpr):
        pid, pid_k = tl.program_id(0), tl.program_id(1)
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        k_len = K // SPLIT_K
        for k0 in tl.range(pid_k * k_len, (pid_k + 1) * k_len, BLOCK_K, warp_specialize=WS):
            w = w_desc.load([pid * BLOCK_N, k0])
            x = x_desc.load([0, k0])
            acc = tl.dot(w, tl.trans(x), acc)
        out = tl.trans(acc)
        m = tl.arange(0, BLOCK_M)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + pid_k * M * N + m[:, None] * N + rows[None, :], out,
                 mask=(m < M)[:, None] & (rows < N)[None, :])

    return triton, skinny_ptr, skinny_tma


# --part skinny: (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) per product
SKINNY = {"in_proj": [(64, 64, 1, 4, 6), (64, 128, 1, 4, 4), (64, 128, 1, 4, 6), (128, 64, 1, 4, 6),
                      (128, 128, 1, 8, 4), (64, 128, 2, 4, 4), (64, 256, 1, 4, 3), (128, 128, 1, 4, 4),
                      (128, 256, 1, 8, 3)],
          "out_proj": [(64, 128, 2, 4, 5), (64, 128, 4, 4, 4), (64, 256, 2, 4, 3), (128, 128, 4, 8, 4),
                       (64, 64, 4, 4, 8), (64, 128, 1, 4, 6), (128, 256, 4, 8, 3), (128, 128, 2, 4, 4)]}


def skinny_bench(model, batches: list[int], hows: list[str]):
    """--part skinny (see the module's docstring)."""
    triton, skinny_ptr, skinny_tma = _skinny_kernels()
    from triton.tools.tensor_descriptor import TensorDescriptor

    lm = model.model.language_model
    weights = {"in_proj": [layer.mixer.in_proj.weight for layer in lm.layers],
               "out_proj": [layer.mixer.out_proj.weight for layer in lm.layers]}

    def timed(launch) -> float:
        return kernel_us(launch, len(lm.layers), ("skinny",))

    names = {"ptr": "cp.async", "tma": "TMA", "tma-ws": "TMA, warp-specialised"}
    for batch in batches:
        print(f"\n===== bare 16-row products, batch {batch}: µs per call (TB/s of weights)")
        print("| product | BLOCK_N, BLOCK_K, SPLIT_K, warps, stages | " + " | ".join(names[h] for h in hows) + " |")
        print("|---|---|" + "---:|" * len(hows))
        for product, configs in SKINNY.items():
            n, k = weights[product][0].shape
            x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(4, batch, n, device="cuda")
            for bn, bk, split, warps, stages in configs:
                row = []
                for how in hows:
                    meta = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps,
                                num_stages=stages)
                    if how == "ptr":
                        def launch(i):
                            w = weights[product][i]
                            skinny_ptr[(triton.cdiv(n, bn), split)](x, w, out, batch, n, k, w.stride(0), **meta)
                    else:
                        x_desc = TensorDescriptor.from_tensor(x[:batch], [16, bk])
                        descs = [TensorDescriptor.from_tensor(w, [bn, bk]) for w in weights[product]]

                        def launch(i, x_desc=x_desc, descs=descs, ws=how == "tma-ws"):
                            skinny_tma[(triton.cdiv(n, bn), split)](x_desc, descs[i], out, batch, n, k, WS=ws,
                                                                    **meta)
                    try:
                        us = timed(launch)
                        row.append(f"{us:.1f} ({n * k * 2 / us / 1e6:.2f})")
                    except Exception as error:
                        row.append(f"failed ({type(error).__name__}: {str(error)[:60]})")
                print(f"| {product} | {bn}, {bk}, {split}, {warps}, {stages} | " + " | ".join(row) + " |",
                      flush=True)


SSM_ALONE = [(16, 4), (16, 2), (8, 2), (8, 1), (32, 4), (32, 8), (64, 4), (64, 8)]  # (BLOCK_P, num_warps)


def ssm_alone(model, batches: list[int], state_dtypes: list[str]):
    """--part ssm (see the module's docstring)."""
    lm = model.model.language_model
    s = generation_mlmamba._block_shape(lm)
    triton, kernels = generation_mlmamba._fused_kernels(autotune=False)
    ssm_step_gate = kernels[1]
    mixers = [layer.mixer for layer in lm.layers]
    n_in = mixers[0].in_proj.weight.shape[0]
    x_start = s.intermediate
    b_start = x_start + s.intermediate
    c_start = b_start + s.groups * s.state
    dt_start = c_start + s.groups * s.state
    for batch in batches:
        projected = torch.randn(batch, 1, n_in, device="cuda", dtype=torch.bfloat16)
        gated = torch.empty(batch, s.intermediate, device="cuda", dtype=torch.bfloat16)
        parts = torch.empty(batch, s.heads * s.head_dim, device="cuda")
        for dtype_name in state_dtypes:
            states = [torch.randn(batch, s.heads, s.head_dim, s.state, device="cuda").to(getattr(torch, dtype_name))
                      for _ in mixers]
            nbytes = 2 * states[0].numel() * states[0].element_size()
            print(f"\n===== SSM update alone, batch {batch}, {dtype_name} state ({nbytes / 1e6:.1f} MB read + written)")
            print("| BLOCK_P, warps | µs | TB/s |\n|---|---:|---:|")
            for block_p, warps in SSM_ALONE:
                def launch(i):
                    m = mixers[i]
                    ssm_step_gate[(triton.cdiv(s.head_dim, block_p), s.heads, batch)](
                        projected, states[i], m.A_log, m.D, m.dt_bias, m.norm.weight, gated, parts,
                        projected.stride(0), *states[i].stride(), gated.stride(0), parts.stride(0),
                        x_start, b_start, c_start, dt_start, s.heads // s.groups, s.head_dim, s.state,
                        HAS_D=True, HAS_DT_BIAS=True, BLOCK_P=block_p, BLOCK_S=triton.next_power_of_2(s.state),
                        USE_PDL=False, num_warps=warps)
                us = kernel_us(launch, len(mixers), ("ssm_step_gate",))
                print(f"| {block_p}, {warps} | {us:.1f} | {nbytes / us / 1e6:.2f} |", flush=True)


def gemv_bench(model):
    """The layer's two matrix-vector products at batch 1: cuBLAS (F.linear) against the Triton kernel (decode_gemv),
    64 calls captured in a CUDA graph (as in the step), µs per call and TB/s of weights read."""
    gemv = generation_mlmamba.decode_gemv()
    m = model.model.language_model.layers[0].mixer
    print("\n===== batch-1 matrix-vector products (µs per call, weight bytes / time)")
    print("| product | cuBLAS | Triton | max |Δ| / max |ref| |\n|---|---:|---:|---:|")
    for name, weight, width in [("in_proj", m.in_proj.weight, m.in_proj.in_features),
                                ("out_proj", m.out_proj.weight, m.out_proj.in_features)]:
        weights = [weight.clone() for _ in range(16)]  # 16 distinct copies: no L2 reuse between calls
        x = torch.randn(1, 1, width, device="cuda", dtype=weight.dtype)
        reference = (x.double() @ weights[0].double().T).float()
        err = ((gemv(x, weights[0], None).float() - reference).abs().max() / reference.abs().max()).item()
        row = []
        for fn in (lambda w: torch.nn.functional.linear(x, w), lambda w: gemv(x, w, None)):
            for w in weights:
                fn(w)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(4):
                    for w in weights:
                        fn(w)
            us = 1e3 * replay_ms(graph, n=10, warmup=1) / 64
            row.append(f"{us:.1f} ({weight.numel() * weight.element_size() / us / 1e6:.2f} TB/s)")
        print(f"| {name} {tuple(weight.shape)} | {row[0]} | {row[1]} | {err:.1e} |", flush=True)


def timeline(model, batches: list[int], state_dtypes: list[str], env_sets: list[dict]):
    """--part timeline (see the module's docstring)."""
    for env in env_sets:
        os.environ.update(env, MLMAMBA_TRACE="1")  # read by each new runner's fused layer
        print(f"\n##### settings: {env or 'defaults'}")
        try:
            _timeline(model, batches, state_dtypes)
        finally:
            for key in [*env, "MLMAMBA_TRACE"]:
                os.environ.pop(key, None)
            model.config.ssm_state_dtype = "auto"  # the default


def _timeline(model, batches: list[int], state_dtypes: list[str]):
    from generation import TEXT_TOKENS, Spec, random_image

    spec = Spec("mlmamba", model)
    pixel_values = spec.preprocess([random_image()]).to("cuda", torch.bfloat16)
    names = ("in_proj", "SSM", "out_proj")
    for batch in [b for b in batches if b > 1]:
        for state_dtype in state_dtypes:
            model._decode_graphs = None
            model.config.ssm_state_dtype = state_dtype
            inputs = dict(input_ids=spec.input_ids(batch, TEXT_TOKENS, "cuda"),
                          pixel_values=pixel_values.expand(batch, -1, -1, -1).contiguous())
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                               cache_implementation="static")
                runner = model._decode_graphs
                _, static_ids, _, cache = runner.graphs[batch]
                block = runner._fused_fn()
                if block is None or block.trace is None:
                    print(f"batch {batch}: no fused layer with tracing here")
                    return
                block.trace["next"] = 0
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    runner._step(static_ids, cache)
                launches = block.trace["next"]
                traced_ms = replay_ms(graph)
                block.trace["buffer"].zero_()  # earlier launches (warm-up, capture) wrote other slots' programs
                graph.replay()
                torch.cuda.synchronize()
                buf = block.trace["buffer"][:launches].cpu()
            runner.release(keep=())
            # per launch: programs' (start, ready, done) in µs from the step's first start
            t0 = buf[0, :, 0][buf[0, :, 0] > 0].min()
            rows = []
            for slot in range(launches):
                used = buf[slot, :, 0] > 0
                times = (buf[slot][used][:, :3] - t0).double() / 1e3
                rows.append(dict(n=int(used.sum()), sms=len(set(buf[slot][used][:, 3].tolist())),
                                 start=times[:, 0], ready=times[:, 1], done=times[:, 2]))
            layers = launches // 3
            print(f"\n===== timeline of one decode step, batch {batch}, {state_dtype} state: graph replay "
                  f"{traced_ms:.3f} ms with the timestamps; µs, mean over layers 1..{layers - 2}")
            print("| kernel | programs | SMs | first start | first ready | median ready | last ready | median done | "
                  "90% done | last done | span (first ready → last done) |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for k, name in enumerate(names):
                stats = {  # (times of its programs, statistic), from the previous kernel's last program done
                    "first start": ("start", torch.min), "first ready": ("ready", torch.min),
                    "median ready": ("ready", torch.median), "last ready": ("ready", torch.max),
                    "median done": ("done", torch.median), "90% done": ("done", lambda t: t.quantile(0.9)),
                    "last done": ("done", torch.max),
                }
                cols = {c: [] for c in [*stats, "span"]}
                for layer in range(1, layers - 1):
                    r = rows[3 * layer + k]
                    prev_done = rows[3 * layer + k - 1]["done"].max()  # the kernel before it
                    for column, (point, statistic) in stats.items():
                        cols[column].append(float(statistic(r[point]) - prev_done))
                    cols["span"].append(float(r["done"].max() - r["ready"].min()))
                n, sms = rows[3 + k]["n"], rows[3 + k]["sms"]
                print(f"| {name} | {n} | {sms} | " + " | ".join(f"{sum(v) / len(v):.1f}" for v in cols.values()) + " |")
            per_layer = [float(rows[3 * (layer + 1)]["ready"].min() - rows[3 * layer]["ready"].min())
                         for layer in range(1, layers - 1)]
            print(f"(times from the previous kernel's last program done; a layer: {sum(per_layer) / len(per_layer):.1f}"
                  f" µs from in_proj's first ready to the next in_proj's)")


def ladder(model, batches: list[int], tokens: int):
    """--part ladder (see the module's docstring)."""
    from torch.profiler import ProfilerActivity, profile

    from modeling_mlmamba.generation_mlmamba import ShapeGraphs, prefill_chunks
    from modeling_mlmamba.modeling_mlmamba import MLMambaCausalLMOutput

    import gc

    os.environ.setdefault("MLMAMBA_PREFILL_CHUNK", "512")  # the ladder is off by default
    lm = model.model.language_model
    for batch in batches:
        runner = generation_mlmamba.DecodeGraphRunner(model, MLMambaCausalLMOutput)
        torch.cuda.synchronize()
        start = time.perf_counter()
        runner.cache_for(batch)
        torch.cuda.synchronize()
        limit = runner.chunk_limits.get(batch, 0)
        print(f"\n===== prefill chunk ladder, batch {batch}: up to {limit} tokens, captured in "
              f"{time.perf_counter() - start:.1f} s ({len(runner.chunk_graphs.graphs)} graphs)")
        embeds = torch.randn(batch, tokens, lm.config.hidden_size, device="cuda", dtype=lm.embeddings.weight.dtype)

        def events_ms(fn, n: int = 10) -> float:
            fn()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / n

        print("| chunk (tokens) | ms per replay |\n|---:|---:|")
        for bit in range(limit.bit_length()):
            size = 1 << bit
            chunk = embeds[:, :size]
            print(f"| {size} | {events_ms(lambda: runner.chunk_graphs.replay(chunk, clone=False)):.2f} |", flush=True)
        whole = ShapeGraphs(runner._lm_prefill, mutated=runner._prefill_states, before=runner._mark_empty)
        whole_ms = events_ms(lambda: whole.replay(embeds, clone=False)) if whole.prepare(embeds) else float("nan")
        print(f"{tokens} tokens: whole-prompt graph {whole_ms:.2f} ms; "
              f"ladder ({'+'.join(map(str, prefill_chunks(tokens, limit)))}) "
              f"{events_ms(lambda: runner._chunked_prefill(embeds)):.2f} ms")
        size = min(512, limit)
        for name, before in (("whole prompt", runner._mark_empty), ("a chunk continuing the cache", runner._mark_continuing)):
            chunk = embeds[:, :size]
            before(chunk)
            runner._lm_prefill(chunk)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                before(chunk)
                runner._lm_prefill(chunk)
                torch.cuda.synchronize()
            events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:14]
            total = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
            print(f"\n{size} tokens, batch {batch}, {name}, eager: {total:.2f} ms of kernels")
            print("| kernel | calls | ms |\n|---|---:|---:|")
            for e in events:
                print(f"| {e.key[:90]} | {e.count} | {e.self_device_time_total / 1e3:.2f} |")
        runner = whole = None  # noqa: F841 (frees the ladder before the next batch size: the graphs and the
        gc.collect()  # runner refer to each other)
        torch.cuda.empty_cache()


def main():
    args = parse_args()
    torch._dynamo.config.cache_size_limit = 64
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {copy_bandwidth('cuda', False) / 1e12:.2f} TB/s")
    model = build("mlmamba", False, "cuda", torch.bfloat16)
    parts = args.part.split(",")
    if "prefill" in parts:
        prefill_parts(model, args.tokens)
    if "gemv" in parts:
        gemv_bench(model)
    if "kernels" in parts:
        for batch in [int(b) for b in args.batches.split(",")]:
            for state_dtype in args.state_dtypes.split(","):
                step_kernels(model, batch, state_dtype)
    if "sweep" in parts:
        sweep(model, [int(b) for b in args.batches.split(",")], args.state_dtypes.split(","))
    if "skinny" in parts:
        skinny_bench(model, [int(b) for b in args.batches.split(",") if int(b) > 1], args.skinny.split(","))
    if "ssm" in parts:
        ssm_alone(model, [int(b) for b in args.batches.split(",")], args.state_dtypes.split(","))
    if "rows" in parts:
        rows_products(model, [int(b) for b in args.batches.split(",") if int(b) > 1])
    if "timeline" in parts:
        timeline(model, [int(b) for b in args.batches.split(",")], args.state_dtypes.split(","), _env_sets(args.env))
    if "ladder" in parts:
        ladder(model, [int(b) for b in args.batches.split(",")], args.tokens)
    if "decode" in parts:
        decode_variants(model, [int(b) for b in args.batches.split(",")], args.variants.split(","),
                        _env_sets(args.env))


if __name__ == "__main__":
    main()
