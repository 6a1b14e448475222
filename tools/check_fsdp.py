#!/usr/bin/env python
"""Checks recipes/finetune.py under FSDP on 2+ GPUs (Accelerate refuses FSDP on CPU, so CI cannot run this).

On a tiny model and tiny data (the test suite's helpers), with float32 everywhere so that runs are comparable:
  1. LoRA, DDP (recipes/accelerate_ddp.yaml), 8 steps: the reference adapter;
  2. LoRA, FSDP (recipes/accelerate_fsdp.yaml), 8 steps, checkpoint every 2: its adapter must hold the same tensors
     as the DDP one (the FSDP-wrapped layers included) and the run the same per-step losses; the merged folder must
     load with trust_remote_code and give the adapter model's logits;
  3. LoRA, FSDP, stopped after step 4, then `--resume`: must follow run 2's losses and end with its adapter;
  4. full fine-tuning, FSDP, 4 steps: the merged folder loads and its weights moved from the base.

  python tools/check_fsdp.py --workdir /tmp/fsdp_check [--num_processes 2]
Prints one line per check and exits non-zero when one fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--timeout", type=int, default=240, help="seconds per training run")
    return p.parse_args()


def setup(root: Path) -> tuple[str, str]:
    from PIL import Image

    from tests.test_recipes import COLOURS, llava_record, write_jsonl
    from tests.tiny import tiny_model, tiny_processor, tiny_text_config

    base, data = root / "base", root / "data"
    # LM widths that are multiples of 8: causal_conv1d (used by transformers' Mamba-2 on a GPU) refuses others
    tiny_model(seed=0, text_config=tiny_text_config(num_heads=8, head_dim=8)).save_pretrained(base)
    tiny_processor().save_pretrained(base)
    (data / "images").mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 40), rgb).save(data / "images" / f"{name}.png")
    write_jsonl(str(data / "train.jsonl"), [llava_record(c, i) for i in range(4) for c in COLOURS])
    return str(base), str(data)


def finetune(config: str, nproc: int, base: str, data: str, out: str, *extra: str, timeout: int) -> float:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes" / config),
        "--num_processes", str(nproc), str(REPO / "recipes" / "finetune.py"),
        "--model", base, "--data", os.path.join(data, "train.jsonl"), "--image_folder", os.path.join(data, "images"),
        "--output_dir", out, "--per_device_batch_size", "2", "--global_batch_size", str(2 * nproc),
        "--learning_rate", "1e-2", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--num_workers", "0",
        "--max_length", "64", "--mixed_precision", "no", "--seed", "0", *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    log = Path(out + ".log")
    log.write_text(result.stdout + "\n" + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{config} {' '.join(extra)} failed ({result.returncode}); last lines:\n"
                           + "\n".join((result.stdout + result.stderr).splitlines()[-30:]))
    return time.time() - start


def adapter(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))


def losses_of(folder: Path) -> list[float]:
    """Per-step training losses from a run's log.jsonl (the last value logged for each step)."""
    by_step = {}
    for line in open(folder / "log.jsonl"):
        record = json.loads(line)
        if "train/loss" in record:
            by_step[record["step"]] = record["train/loss"]
    return [by_step[s] for s in sorted(by_step)]


def compare(a: dict, b: dict, atol: float) -> tuple[bool, str]:
    if set(a) != set(b):
        return False, f"keys differ: only first {sorted(set(a) - set(b))[:4]}, only second {sorted(set(b) - set(a))[:4]}"
    worst = max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)
    return worst[0] <= atol, f"{len(a)} tensors, largest difference {worst[0]:.2e} ({worst[1]})"


def main():
    args = parse_args()
    import torch

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    base, data = setup(root)
    n = args.num_processes
    results = []

    def check(name, ok, detail):
        results.append(ok)
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)

    lora = ["--max_steps", "8", "--save_every", "2", "--save_total_limit", "10"]
    t = finetune("accelerate_ddp.yaml", n, base, data, str(root / "ddp"), *lora, "--no_merge", timeout=args.timeout)
    print(f"DDP LoRA run: {t:.0f} s", flush=True)
    t = finetune("accelerate_fsdp.yaml", n, base, data, str(root / "fsdp"), *lora, timeout=args.timeout)
    print(f"FSDP LoRA run: {t:.0f} s", flush=True)
    ddp, fsdp = adapter(str(root / "ddp")), adapter(str(root / "fsdp"))
    lm_keys = [k for k in fsdp if "language_model.layers" in k]
    check("FSDP adapter holds the wrapped layers' LoRA weights", bool(lm_keys) and all(fsdp[k].abs().sum() > 0
          for k in lm_keys if "lora_B" in k), f"{len(lm_keys)} LM LoRA tensors")
    same_keys, detail = compare(ddp, fsdp, atol=float("inf"))
    check("FSDP adapter has the DDP adapter's tensors", same_keys, detail)
    # Bit-equality is not expected (GPU reductions differ between DDP and FSDP, and Adam turns float noise in tiny
    # gradients into updates of up to ~lr): the two runs must follow the same loss curve.
    losses, ddp_losses = losses_of(root / "fsdp"), losses_of(root / "ddp")
    check("FSDP trains like DDP (per-step losses)", len(losses) == len(ddp_losses) == 8 and
          max(abs(a - b) for a, b in zip(losses, ddp_losses)) < 1e-3,
          f"largest loss difference {max(abs(a - b) for a, b in zip(losses, ddp_losses)):.1e} over 8 steps")
    check("FSDP LoRA lowers the loss", len(losses) >= 2 and losses[-1] < losses[0], f"{losses[0]:.3f} → {losses[-1]:.3f}")
    steps = sorted(p.name for p in (root / "fsdp" / "checkpoints").iterdir())
    check("FSDP checkpoints every 2 steps", steps == [f"step-{s}" for s in (2, 4, 6, 8)], ", ".join(steps))

    # the merged folder against the adapter applied to the base, on one image-text batch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests.test_recipes import example_batch

    processor = AutoProcessor.from_pretrained(base, trust_remote_code=True)
    # on the GPU: with causal_conv1d installed, transformers' Mamba-2 sends even CPU tensors to its CUDA kernel
    batch = {k: v.cuda() for k, v in example_batch(processor, data).items()}
    merged = AutoModelForImageTextToText.from_pretrained(str(root / "fsdp" / "merged"), trust_remote_code=True)
    merged = merged.cuda().eval()
    with_adapter = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=True), str(root / "fsdp" / "adapter")
    ).cuda().eval()
    with torch.no_grad():
        a, b = merged(**batch).logits, with_adapter(**batch).logits
    check("FSDP merged folder = base + adapter", torch.allclose(a, b, atol=1e-4), f"max |Δlogit| {(a - b).abs().max():.2e}")

    # stop after step 4, resume
    out = str(root / "fsdp_resumed")
    finetune("accelerate_fsdp.yaml", n, base, data, out, *lora, "--no_merge", "--stop_after_step", "4",
             timeout=args.timeout)
    finetune("accelerate_fsdp.yaml", n, base, data, out, *lora, "--no_merge", "--resume", timeout=args.timeout)
    resumed = losses_of(Path(out))
    check("FSDP resume: the first resumed step sees the uninterrupted run's weights and batch",
          abs(resumed[4] - losses[4]) < 1e-5, f"step-5 loss {resumed[4]:.6f} vs {losses[4]:.6f}")
    check("FSDP resume: later steps follow the uninterrupted run (optimizer state restored)",
          max(abs(a - b) for a, b in zip(resumed[5:], losses[5:])) < 1e-3,
          "losses 6-8: " + ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(resumed[5:], losses[5:])))
    check("FSDP stop at 4 + --resume = uninterrupted (adapter)", *compare(fsdp, adapter(out), atol=1e-3))

    # full fine-tuning
    out = str(root / "fsdp_full")
    finetune("accelerate_fsdp.yaml", n, base, data, out, "--mode", "full", "--max_steps", "4", "--learning_rate", "1e-3",
             timeout=args.timeout)
    tuned = AutoModelForImageTextToText.from_pretrained(os.path.join(out, "merged"), trust_remote_code=True)
    original = AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=True)
    moved = {k for k, v in tuned.state_dict().items() if not torch.equal(v, original.state_dict()[k])}
    towers = [k for k in moved if "vision_towers" in k]
    check("FSDP full fine-tuning trains the LM and connector, not the towers",
          any("language_model.layers" in k for k in moved) and any("connector" in k for k in moved) and not towers,
          f"{len(moved)} tensors moved, {len(towers)} in the towers")
    print(f"{sum(results)}/{len(results)} checks passed", flush=True)
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
