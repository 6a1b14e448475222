#!/usr/bin/env python
"""Generation speed of ML-Mamba on one GPU, against a transformer VLM of the same size class, in one run.

Random bf16 weights at the released shapes (SPEC §1): DINOv2-L/14-reg4 + SigLIP-SO400M/14 at 384 px → MSC →
Mamba-2 2.7B. The peer is transformers' own `LlavaForConditionalGeneration` with a Phi-2-shaped LM (2.7B,
32 layers, width 2560) and SigLIP-SO400M/14 at 384 px (LLaVA takes one tower: it is given the larger of ours),
in its fastest transformers setting: SDPA, static cache, `generate()`'s automatic torch.compile (reduce-overhead).
ML-Mamba runs `generate(..., cache_implementation="static")`: its fast path (generation_mlmamba.py).

Figures (each model):
  - end to end, batch 1: PIL image → preprocessing → prefill → 256 new tokens (greedy), seconds and new tokens/s
    (after two untimed calls: compilation and capture, then the prompt shape's second sight);
  - end to end as above for a question of a length not asked before, each time (ML-Mamba: its prefill runs eagerly
    then, or, with MLMAMBA_PREFILL_CHUNK=512, replays the chunk ladder's graphs);
  - prefill (towers + connector + 800-token LM prefill), batch 1 and 8, as generate() runs it (ML-Mamba: into its
    fast path's cache, where a prompt shape seen before replays from CUDA graphs; also transformers' eager prefill
    without the fast path's cache), and for prompt lengths not seen before;
  - decode ms per token at batch 1, 8, 64 (generation time of N new tokens minus that of 1, over N - 1);
  - new tokens/s at batch 8 × 4096 new tokens; peak GPU memory after 256, 1024, 4096 new tokens (batch 8);
  - the floor: bytes a batch-1 decode step must move (LM weights once, plus the SSM state, or the KV cache of a
    256-token answer's mid-point) over the device-to-device copy bandwidth measured in the same run.

  python benchmarks/generation.py                      # both models, writes docs/benchmarks.json
  python benchmarks/generation.py --models mlmamba     # one model; --merge keeps the other's figures in the JSON
  python benchmarks/generation.py --tiny --device cpu  # seconds on a CPU: checks the script, not the speed
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import LlavaConfig, LlavaForConditionalGeneration, StoppingCriteria  # noqa: E402

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration  # noqa: E402
from modeling_mlmamba.configuration_mlmamba import RELEASED_VISION_CONFIGS  # noqa: E402

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # DINOv2
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # SigLIP
TEXT_TOKENS = 20  # the question after the image (SPEC §8: "image + 20-token prompt")
PREFILL_TOKENS = 800


# --ssm-state-dtype → the key of ML-Mamba's figures in the JSON
STATE_KEYS = {"auto": "mlmamba", "float32": "mlmamba_float32_state", "bfloat16": "mlmamba_bf16_state"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlmamba,llava", help="comma-separated: mlmamba, llava")
    p.add_argument("--tiny", action="store_true", help="toy shapes and lengths: checks the script in seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.json"), help="JSON written here")
    p.add_argument("--merge", action="store_true", help="keep the other models' figures already in --out")
    p.add_argument("--e2e-tokens", type=int, default=256)
    p.add_argument("--long-tokens", type=int, default=4096, help="the batch-8 long generation")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the short figures (median)")
    p.add_argument("--skip-torch-path", action="store_true", help="skip ML-Mamba's plain generate() reference")
    p.add_argument("--ssm-state-dtype", default="auto", choices=list(STATE_KEYS),
                   help="ML-Mamba's config.ssm_state_dtype (auto: the LM's dtype, bf16 here); a non-default one is "
                        "stored as model 'mlmamba_float32_state' / 'mlmamba_bf16_state'")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------------
def mlmamba_config(tiny: bool) -> MLMambaConfig:
    if not tiny:
        return MLMambaConfig()  # the released shapes
    vision = [
        dict(model_type="dinov2_with_registers", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_register_tokens=4, patch_size=14, image_size=56, mlp_ratio=2),
        dict(model_type="siglip_vision_model", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=2, patch_size=14, image_size=56),
    ]
    text = dict(model_type="mamba2", vocab_size=512, hidden_size=128, num_hidden_layers=2, state_size=32,
                expand=2, head_dim=32, num_heads=8, n_groups=1, conv_kernel=4, chunk_size=32,
                tie_word_embeddings=True, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    return MLMambaConfig(vision_config=vision, text_config=text, image_token_id=511, connector_hidden_size=128,
                         projector_hidden_size=256)


def llava_config(tiny: bool) -> LlavaConfig:
    siglip = {k: v for k, v in RELEASED_VISION_CONFIGS[1].items() if k != "model_type"}
    # Phi-2: 32 layers, width 2560, 32 heads, MLP 10240, partial rotary 0.4, vocabulary 51200
    phi = dict(model_type="phi", vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
               num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=8192,
               pad_token_id=0, eos_token_id=0, bos_token_id=0)
    if tiny:
        siglip = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, patch_size=14,
                      image_size=56)
        phi.update(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    config = LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", **siglip),
        text_config=phi,
        image_token_id=phi["vocab_size"] - 1,
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
        image_seq_length=(siglip["image_size"] // siglip["patch_size"]) ** 2,
        projector_hidden_act="gelu",
    )
    config._attn_implementation = "sdpa"
    return config


def build(name: str, tiny: bool, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    with torch.device(device):
        if name == "mlmamba":
            model = MLMambaForConditionalGeneration(mlmamba_config(tiny))
        else:
            model = LlavaForConditionalGeneration(llava_config(tiny))
    return model.to(dtype).eval()


class Spec:
    """What differs between the two models for the benchmark: image size, normalisations, image tokens."""

    def __init__(self, name: str, model):
        self.name = name
        config = model.config
        if name == "mlmamba":
            self.size, self.norms = config.image_size, [IMAGENET, HALF]
            self.image_tokens, self.image_token_id = config.num_image_tokens, config.image_token_id
        else:
            self.size, self.norms = config.vision_config.image_size, [HALF]
            self.image_tokens, self.image_token_id = config.image_seq_length, config.image_token_id
        self.processor = None
        if name == "mlmamba":
            try:  # the package's own processor, when it exists (image_processing_mlmamba.py)
                from modeling_mlmamba.image_processing_mlmamba import MLMambaImageProcessor

                self.processor = MLMambaImageProcessor.from_model_config(config)
            except Exception:
                self.processor = None

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images → (N, 3 × towers, size, size): resize bicubic, no crop, [0, 1], normalised per tower (SPEC §3)."""
        if self.processor is not None:
            return self.processor(images=images, return_tensors="pt")["pixel_values"]
        # Stand-in for the processor (swap for MLMambaImageProcessor when it exists): the same arithmetic.
        out = []
        for image in images:
            x = np.asarray(image.convert("RGB").resize((self.size, self.size), Image.BICUBIC), dtype=np.float32)
            x = torch.from_numpy(x).permute(2, 0, 1) / 255.0
            out.append(torch.cat([(x - torch.tensor(m)[:, None, None]) / torch.tensor(s)[:, None, None]
                                  for m, s in self.norms]))
        return torch.stack(out)

    def input_ids(self, batch: int, text_tokens: int, device) -> torch.Tensor:
        generator = torch.Generator().manual_seed(text_tokens)
        text = torch.randint(1, 500, (batch, text_tokens), generator=generator)
        image = torch.full((batch, self.image_tokens), self.image_token_id)
        return torch.cat([image, text], dim=1).to(device)


def random_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


class StopAfter(StoppingCriteria):
    """Stops after `n` new tokens: warms a long generation's compiled shapes up without decoding it all."""

    def __init__(self, prompt_length: int, n: int):
        self.limit = prompt_length + n

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.limit, dtype=torch.bool,
                          device=input_ids.device)


def generate(model, inputs, new_tokens: int, fast: bool = True, **kwargs):
    options = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    if fast:
        options["cache_implementation"] = "static"
    return model.generate(**inputs, **options, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The figures
# ----------------------------------------------------------------------------------------------------------------
def copy_bandwidth(device: str, tiny: bool) -> float | None:
    """Device-to-device copy, bytes read + written per second (median of 20 after warm-up)."""
    if not device.startswith("cuda"):
        return None
    n = (1 << 30) // 2 if not tiny else 1 << 20
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * n * 2 / statistics.median(times)


def graph_replay_ms(model, batch: int) -> float | None:
    """GPU time of one replay of ML-Mamba's captured decode step (back-to-back replays, no host work between):
    the step without generate()'s loop around it. None for models without one."""
    runner = getattr(model, "_decode_graphs", None)
    if runner is None or batch not in runner.graphs:
        return None
    return replay_ms(runner.graphs[batch][0])


def replay_ms(graph: torch.cuda.CUDAGraph, n: int = 64, warmup: int = 5) -> float:
    """Milliseconds per replay of a CUDA graph, replayed back to back (CUDA events around n replays; n a multiple of
    the fused layer's 16 steps between SSM state write-backs, so that each round is counted whole)."""
    for _ in range(warmup):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def decode_bytes(name: str, model, context: int) -> dict:
    """Bytes one batch-1 decode step must move: each LM weight once (the tied embedding once, for the head),
    plus the recurrent state (Mamba-2) or the KV cache at `context` tokens (Phi-2)."""
    lm = model.model.language_model
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    if name == "mlmamba":
        tc = model.config.text_config
        conv_dim = int(tc.expand * tc.hidden_size) + 2 * tc.n_groups * tc.state_size
        state = tc.num_hidden_layers * (tc.num_heads * tc.head_dim * tc.state_size * 4 + conv_dim * tc.conv_kernel * 2)
    else:
        tc = model.config.text_config
        state = tc.num_hidden_layers * 2 * context * tc.hidden_size * 2
    return dict(weights_bytes=weights, state_bytes=state, total_bytes=weights + state)


def run_model(name: str, args, log) -> dict:
    device, tiny = args.device, args.tiny
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    e2e_tokens = 8 if tiny else args.e2e_tokens
    long_tokens = 24 if tiny else args.long_tokens
    mid_tokens = 16 if tiny else 1024
    decode_tokens = {1: 8, 8: 8, 64: 8} if tiny else {1: 256, 8: 256, 64: 128}
    repeats = 1 if tiny else args.repeats
    cuda = device.startswith("cuda")

    t_build, model = timed(lambda: build(name, tiny, device, dtype), device)
    if name == "mlmamba":
        model.config.ssm_state_dtype = args.ssm_state_dtype
    spec = Spec(name, model)
    params = sum(p.numel() for p in model.parameters())
    if name == "mlmamba":
        from modeling_mlmamba.generation_mlmamba import decode_kernels

        log(f"[{name}] decode-step kernels (conv, SSM update): {decode_kernels()[2]}")
    r = dict(parameters=params, build_s=t_build,
             preprocessing="MLMambaImageProcessor" if spec.processor is not None else "benchmark stand-in (PIL+torch)")
    log(f"[{name}] built in {t_build:.1f} s, {params / 1e9:.3f} B parameters, {r['preprocessing']}")
    image = random_image()
    pixel_values = spec.preprocess([image]).to(device, dtype)

    def inputs_for(batch, text_tokens=TEXT_TOKENS):
        return dict(input_ids=spec.input_ids(batch, text_tokens, device), pixel_values=pixel_values.expand(batch, -1, -1, -1).contiguous())

    with torch.no_grad():
        # ---- warm-up / first call (compilation, autotuning, graph capture) ----
        t_first, _ = timed(lambda: generate(model, inputs_for(1), e2e_tokens), device)
        r["first_call_s"] = t_first
        log(f"[{name}] first call (compile + capture + {e2e_tokens} tokens): {t_first:.1f} s")

        # ---- end to end, batch 1 ----
        def end_to_end():
            pv = spec.preprocess([image]).to(device, dtype)
            return generate(model, dict(input_ids=spec.input_ids(1, TEXT_TOKENS, device), pixel_values=pv), e2e_tokens)

        t_second, _ = timed(end_to_end, device)  # ML-Mamba: the prompt shape's second sight captures its prefill
        r["second_call_s"] = t_second
        times = [timed(end_to_end, device)[0] for _ in range(repeats)]
        r["e2e_s"] = statistics.median(times)
        r["e2e_new_tokens_per_s"] = e2e_tokens / r["e2e_s"]
        r["e2e_new_tokens"] = e2e_tokens
        log(f"[{name}] end to end, {e2e_tokens} tokens: {r['e2e_s']:.3f} s ({r['e2e_new_tokens_per_s']:.0f} tokens/s)")
        if name == "mlmamba":  # a question of a length not asked before, each time (LLaVA's static cache would be
            # sized, and its step compiled, anew for each length)
            def end_to_end_new_length(extra):
                pv = spec.preprocess([image]).to(device, dtype)
                ids = spec.input_ids(1, TEXT_TOKENS + extra, device)
                return generate(model, dict(input_ids=ids, pixel_values=pv), e2e_tokens)

            times = [timed(lambda: end_to_end_new_length(1 + i), device)[0] for i in range(repeats)]
            r["e2e_new_length_s"] = statistics.median(times)
            r["e2e_new_length_new_tokens_per_s"] = e2e_tokens / r["e2e_new_length_s"]
            log(f"[{name}] end to end, a prompt length not seen before: {r['e2e_new_length_s']:.3f} s "
                f"({r['e2e_new_length_new_tokens_per_s']:.0f} tokens/s)")

        # ---- prefill: towers + connector + 800-token LM prefill ----
        text = (64 if tiny else PREFILL_TOKENS) - spec.image_tokens
        runner = model._decode_graph_runner() if name == "mlmamba" else None
        for batch in (1, 8):
            inputs = inputs_for(batch, max(text, 1))

            def prefill(eager=False):
                # as generate() runs it: ML-Mamba into its fast path's state cache (a prompt shape seen before is
                # replayed from CUDA graphs); the eager figure with transformers' default cache
                cache = dict(cache_params=runner.cache_for(batch)) if runner is not None and not eager else {}
                return model(**inputs, **cache, use_cache=True, logits_to_keep=1)

            for _ in range(2):  # first sighting (eager), second (captured; with ML-Mamba's chunk ladder: chunks)
                prefill()
            times = [timed(prefill, device)[0] for _ in range(repeats)]
            r[f"prefill_b{batch}_ms"] = 1e3 * statistics.median(times)
            r["prefill_tokens"] = inputs["input_ids"].shape[1]
            message = f"[{name}] prefill b{batch} ({r['prefill_tokens']} tokens): {r[f'prefill_b{batch}_ms']:.1f} ms"
            times = []
            for extra in range(1, repeats + 1):  # prompt lengths not seen before (the pixel shape was)
                inputs = inputs_for(batch, max(text, 1) + extra)
                times.append(timed(prefill, device)[0])
            r[f"prefill_b{batch}_new_length_ms"] = 1e3 * statistics.median(times)
            message += f"; a length not seen before: {r[f'prefill_b{batch}_new_length_ms']:.1f} ms"
            inputs = inputs_for(batch, max(text, 1))
            if runner is not None:
                times = [timed(lambda: prefill(eager=True), device)[0] for _ in range(repeats)]
                r[f"prefill_b{batch}_eager_ms"] = 1e3 * statistics.median(times)
                message += f" (eager, transformers' cache: {r[f'prefill_b{batch}_eager_ms']:.1f} ms)"
            log(message)
        if name == "mlmamba":
            feats = lambda: model.model.get_image_features(pixel_values)  # noqa: E731
            feats()
            r["towers_connector_b1_ms"] = 1e3 * statistics.median([timed(feats, device)[0] for _ in range(repeats)])
        gc.collect()

        # ---- decode ms per token at batch 1, 8, 64 ----
        for batch, n in decode_tokens.items():
            if name == "llava":
                model._previous_max_cache_length = -1  # size each static cache to its own run
            inputs = inputs_for(batch)
            generate(model, inputs, n)  # compile / capture for this batch size
            t_n = statistics.median([timed(lambda: generate(model, inputs, n), device)[0] for _ in range(repeats)])
            t_1 = statistics.median([timed(lambda: generate(model, inputs, 1), device)[0] for _ in range(repeats)])
            r[f"decode_b{batch}_ms_per_token"] = 1e3 * (t_n - t_1) / (n - 1)
            replay = graph_replay_ms(model, batch) if cuda else None
            r[f"decode_b{batch}_graph_replay_ms"] = replay
            log(f"[{name}] decode b{batch}: {r[f'decode_b{batch}_ms_per_token']:.2f} ms/token "
                f"({n} tokens in {t_n:.2f} s, 1 token in {t_1 * 1e3:.0f} ms); the step's graph alone: "
                f"{replay if replay is None else f'{replay:.3f} ms'}")
            del inputs
            gc.collect()

        # ---- batch 8: peak memory after 256 / 1024 / 4096 new tokens; tokens/s for the long one ----
        if getattr(model, "_decode_graphs", None) is not None:
            model._decode_graphs.release(keep=(8,))  # the batch-1 / 64 states and graphs would count in the peak
        inputs = inputs_for(8)
        prompt_length = inputs["input_ids"].shape[1]
        for n in (e2e_tokens, mid_tokens, long_tokens):
            if name == "llava":  # compile for this cache length first, stopping after a few tokens
                model._previous_max_cache_length = -1
                generate(model, inputs, n, stopping_criteria=[StopAfter(prompt_length, 4)])
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t, _ = timed(lambda: generate(model, inputs, n), device)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            r[f"peak_GiB_b8_{n}"] = peak
            if n == long_tokens:
                r["b8_long_s"] = t
                r["b8_long_new_tokens_per_s"] = 8 * n / t
                r["long_tokens"] = n
            log(f"[{name}] batch 8, {n} new tokens: {t:.2f} s ({8 * n / t:.0f} tokens/s), peak {peak} GiB")
        r["weights_GiB"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30

        # ---- the torch path and greedy agreement (ML-Mamba only) ----
        if name == "mlmamba" and not args.skip_torch_path:
            inputs = inputs_for(1)
            n = 8 if tiny else 32
            plain = lambda: generate(model, inputs, n, fast=False)  # noqa: E731
            plain()
            t_n = timed(plain, device)[0]
            t_1 = timed(lambda: generate(model, inputs, 1, fast=False), device)[0]
            r["plain_generate_b1_ms_per_token"] = 1e3 * (t_n - t_1) / (n - 1)
            n = 16 if tiny else 128
            reference = generate(model, inputs, n, fast=False)[0, -n:]
            fast = generate(model, inputs, n)[0, -n:]
            same = (reference == fast).int()
            r["greedy_bf16_tokens_compared"] = n
            r["greedy_bf16_first_mismatch"] = None if bool(same.all()) else int((same == 0).nonzero()[0])
            log(f"[{name}] plain generate() b1: {r['plain_generate_b1_ms_per_token']:.1f} ms/token; greedy bf16 fast vs "
                f"plain over {n} tokens: first mismatch {r['greedy_bf16_first_mismatch']}")

        context = prompt_length + e2e_tokens // 2
        r["floor_bytes_b1"] = decode_bytes(name, model, context)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return r


def versions() -> dict:
    out = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda)
    import transformers

    out["transformers"] = transformers.__version__
    for name in ("mamba_ssm", "causal_conv1d", "triton"):
        try:
            out[name] = __import__(name).__version__
        except Exception as error:  # not installed, or failed to import
            out[name] = f"not available ({type(error).__name__})"
    return out


def ratios(result: dict) -> dict:
    m, l = result["models"].get("mlmamba"), result["models"].get("llava")
    out = {}
    bw = result.get("copy_bandwidth_Bps")
    if m and (m.get("copy_bandwidth_Bps") or bw):  # each model's floor from the bandwidth measured in its own run
        floor_ms = 1e3 * m["floor_bytes_b1"]["total_bytes"] / (m.get("copy_bandwidth_Bps") or bw)
        out["mlmamba_floor_ms"] = floor_ms
        out["mlmamba_decode_b1_over_floor"] = m["decode_b1_ms_per_token"] / floor_ms
    if l and (l.get("copy_bandwidth_Bps") or bw):
        out["llava_floor_ms"] = 1e3 * l["floor_bytes_b1"]["total_bytes"] / (l.get("copy_bandwidth_Bps") or bw)
    for key in STATE_KEYS.values():  # ML-Mamba with a state dtype set explicitly (--ssm-state-dtype, --merge)
        v = result["models"].get(key)
        if key != "mlmamba" and v and l and "error" not in v:
            prefix = key.removeprefix("mlmamba_")
            out[f"{prefix}_e2e_tokens_per_s_ratio"] = v["e2e_new_tokens_per_s"] / l["e2e_new_tokens_per_s"]
            out[f"{prefix}_b8_long_tokens_per_s_ratio"] = (v["b8_long_new_tokens_per_s"]
                                                           / l["b8_long_new_tokens_per_s"])
    if m and l:
        out["e2e_tokens_per_s_ratio"] = m["e2e_new_tokens_per_s"] / l["e2e_new_tokens_per_s"]
        out["b8_long_tokens_per_s_ratio"] = m["b8_long_new_tokens_per_s"] / l["b8_long_new_tokens_per_s"]
        for b in (1, 8, 64):
            out[f"decode_b{b}_speedup"] = l[f"decode_b{b}_ms_per_token"] / m[f"decode_b{b}_ms_per_token"]
    return out


def table(result: dict) -> str:
    m, l = result["models"].get("mlmamba", {}), result["models"].get("llava", {})
    columns = [(f"ML-Mamba, {key.removeprefix('mlmamba_').replace('_', ' ')}", result["models"][key])
               for key in STATE_KEYS.values() if key != "mlmamba" and key in result["models"]]
    rows = [
        ("end to end, b1, image → N new tokens (s)", "e2e_s", "{:.3f}"),
        ("end to end, new tokens/s", "e2e_new_tokens_per_s", "{:.0f}"),
        ("prefill b1 (towers + connector + 800-token LM) (ms)", "prefill_b1_ms", "{:.1f}"),
        ("prefill b8 (ms)", "prefill_b8_ms", "{:.1f}"),
        ("prefill b1, a prompt length not seen before (ms)", "prefill_b1_new_length_ms", "{:.1f}"),
        ("prefill b8, a prompt length not seen before (ms)", "prefill_b8_new_length_ms", "{:.1f}"),
        ("end to end, a prompt length not seen before, new tokens/s", "e2e_new_length_new_tokens_per_s", "{:.0f}"),
        ("prefill b1, eager (transformers' cache) (ms)", "prefill_b1_eager_ms", "{:.1f}"),
        ("prefill b8, eager (ms)", "prefill_b8_eager_ms", "{:.1f}"),
        ("decode b1 (ms/token)", "decode_b1_ms_per_token", "{:.2f}"),
        ("decode b8 (ms/token)", "decode_b8_ms_per_token", "{:.2f}"),
        ("decode b64 (ms/token)", "decode_b64_ms_per_token", "{:.2f}"),
        ("  of which the step's CUDA graph, b1 (ms)", "decode_b1_graph_replay_ms", "{:.2f}"),
        ("b8 × long new tokens, new tokens/s", "b8_long_new_tokens_per_s", "{:.0f}"),
        ("peak GiB, b8, 256 new", "peak_GiB_b8_256", "{:.2f}"),
        ("peak GiB, b8, 1024 new", "peak_GiB_b8_1024", "{:.2f}"),
        ("peak GiB, b8, 4096 new", "peak_GiB_b8_4096", "{:.2f}"),
        ("first call: compile + capture (s)", "first_call_s", "{:.1f}"),
    ]

    def fmt(d, key, f):
        v = d.get(key)
        return f.format(v) if isinstance(v, (int, float)) else "–"

    models = [("ML-Mamba (fast path)", m), *columns, ("LLaVA, Phi-2 LM (static, compiled)", l)]
    lines = ["| figure | " + " | ".join(name for name, _ in models) + " |", "|---|" + "---:|" * len(models)]
    lines += [f"| {label} | " + " | ".join(fmt(d, key, f) for _, d in models) + " |" for label, key, f in rows]
    rt = result.get("ratios", {})
    if result.get("copy_bandwidth_Bps"):
        lines.append(f"\ncopy bandwidth {result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read + write)")
    for key, value in rt.items():
        lines.append(f"{key}: {value:.2f}")
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.tiny:
        args.e2e_tokens = 8
    torch._dynamo.config.cache_size_limit = 64
    out_path = Path(args.out)
    result = dict(models={})
    if args.merge and out_path.exists():
        result = json.loads(out_path.read_text())
    log_lines = []

    def log(message):
        print(message, flush=True)
        log_lines.append(message)

    result["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result["versions"] = versions()
    result["command"] = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    result["tiny"] = args.tiny
    bw = copy_bandwidth(args.device, args.tiny)
    result["copy_bandwidth_Bps"] = bw
    log(f"device {result['device']}; versions {result['versions']}; copy bandwidth "
        f"{(bw or 0) / 1e12:.2f} TB/s")
    for name in args.models.split(","):
        key = STATE_KEYS[args.ssm_state_dtype] if name == "mlmamba" else name
        try:
            result["models"][key] = run_model(name, args, log)
            result["models"][key].update(copy_bandwidth_Bps=bw, command=result["command"])
        except Exception as error:
            import traceback

            traceback.print_exc()
            result["models"][key] = dict(error=f"{type(error).__name__}: {error}")
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        result["ratios"] = ratios(result) if all("error" not in v for v in result["models"].values()) else {}
        out_path.write_text(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
