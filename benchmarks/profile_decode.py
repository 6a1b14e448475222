#!/usr/bin/env python
"""Where the time of a decode step and of a prefill goes, on one GPU (released shapes, random bf16 weights).

Prints, for the decode step captured eagerly and compiled:
  - GPU time of one graph replay (back-to-back replays, no host work in between);
  - the wall time per token of `generate()` on top of it (host work of the generation loop + its small kernels);
  - the kernels of one step, by GPU time;
then the prefill's kernels by GPU time and its host time, and a cProfile of the generation loop.

  python benchmarks/profile_decode.py [--modes eager,default] [--tokens 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from generation import PREFILL_TOKENS, TEXT_TOKENS, Spec, build, generate, random_image  # noqa: E402
from generation import replay_ms as time_replays  # noqa: E402
from transformers import CompileConfig  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="eager,default", help="decode step: eager (captured as is), default, max-autotune")
    p.add_argument("--tokens", type=int, default=128, help="new tokens for the generate() timing")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default=None, help="folder for the profiler traces (optional)")
    return p.parse_args()


def kernel_table(prof, rows=25) -> str:
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)


def main():
    args = parse_args()
    torch._dynamo.config.cache_size_limit = 64
    device, dtype = "cuda", torch.bfloat16
    model = build("mlmamba", False, device, dtype)
    spec = Spec("mlmamba", model)
    pixel_values = spec.preprocess([random_image()]).to(device, dtype)
    b = args.batch
    inputs = dict(input_ids=spec.input_ids(b, TEXT_TOKENS, device),
                  pixel_values=pixel_values.expand(b, -1, -1, -1).contiguous())

    with torch.no_grad():
        for mode in args.modes.split(","):
            config = {"eager": CompileConfig(backend="eager"), "default": CompileConfig(),
                      "max-autotune": CompileConfig(mode="max-autotune")}[mode]
            start = time.perf_counter()
            generate(model, inputs, 4, compile_config=config)
            torch.cuda.synchronize()
            print(f"\n===== decode step, {mode}: capture in {time.perf_counter() - start:.1f} s")
            runner = model._decode_graphs
            graph, static_ids, _, cache = runner.graphs[b]
            replay_ms = time_replays(graph, n=200, warmup=10)
            tn = time.perf_counter()
            generate(model, inputs, args.tokens, compile_config=config)
            torch.cuda.synchronize()
            tn = time.perf_counter() - tn
            t1 = time.perf_counter()
            generate(model, inputs, 1, compile_config=config)
            torch.cuda.synchronize()
            t1 = time.perf_counter() - t1
            per_token = 1e3 * (tn - t1) / (args.tokens - 1)
            print(f"graph replay b{b}: {replay_ms:.3f} ms (GPU); generate(): {per_token:.3f} ms/token; "
                  f"loop overhead {per_token - replay_ms:.3f} ms/token; prefill+1 token {1e3 * t1:.1f} ms")
            step = runner._step
            step(static_ids, cache)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step(static_ids, cache)
                torch.cuda.synchronize()
            print("kernels of 3 steps (not graphed):")
            print(kernel_table(prof))
            if args.out:
                prof.export_chrome_trace(f"{args.out}/decode_{mode}.json")

        # ---- the generation loop's host work ----
        profiler = cProfile.Profile()
        profiler.enable()
        generate(model, inputs, 64)
        torch.cuda.synchronize()
        profiler.disable()
        s = io.StringIO()
        pstats.Stats(profiler, stream=s).sort_stats("tottime").print_stats(30)
        print("\n===== generate(64 tokens) host profile, by own time")
        print(s.getvalue()[:6000])

        # ---- prefill ----
        text = PREFILL_TOKENS - spec.image_tokens
        for batch in (1, 8):
            pin = dict(input_ids=spec.input_ids(batch, text, device),
                       pixel_values=pixel_values.expand(batch, -1, -1, -1).contiguous())
            for _ in range(2):
                model(**pin, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(**pin, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            wall = 1e3 * (time.perf_counter() - t)
            t = time.perf_counter()
            lm = model.model.language_model(input_ids=pin["input_ids"].clamp(max=1000), use_cache=False)
            torch.cuda.synchronize()
            lm_wall = 1e3 * (time.perf_counter() - t)
            del lm
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model(**pin, use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
            gpu_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
            print(f"\n===== prefill b{batch}: wall {wall:.1f} ms, kernels {gpu_ms:.1f} ms (GPU busy "
                  f"{100 * gpu_ms / wall:.0f}%); LM alone without cache {lm_wall:.1f} ms")
            print(kernel_table(prof, 30))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
            if args.out:
                prof.export_chrome_trace(f"{args.out}/prefill_b{batch}.json")


if __name__ == "__main__":
    main()
