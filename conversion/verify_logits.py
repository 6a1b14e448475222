#!/usr/bin/env python
"""Compare a converted model's logits with logits saved from the original code base on the same input.

    python conversion/verify_logits.py --model ml-mamba-3b --reference original_logits.pt

The reference file (made in the original environment) is a `torch.save`d dict of tensors:
  - `input_ids`    [1, L] the text ids the original model received (no image token: it prepends the image itself);
  - `pixel_values` [1, 3 × towers, H, W] (towers concatenated on channels in the converted model's order), or the
                   original's dict of per-tower tensors `{"dino": [1, 3, H, W], "siglip": [1, 3, H, W]}`;
  - `logits`       [1, 729 + L, V] (image positions included, as the original returns them) or [1, L, V].
In the original environment, for example:

    vlm = load("path/to/ML-Mamba"); ...; out = vlm(input_ids=ids, pixel_values=pixels)
    torch.save({"input_ids": ids.cpu(), "pixel_values": {k: v.cpu() for k, v in pixels.items()},
                "logits": out.logits.float().cpu()}, "original_logits.pt")

Prints the largest absolute difference and the agreement of the arg-max per position; exits with status 1 when the
difference exceeds --atol (bf16 weights differ from the original's fp32 by ~1e-2 relative: compare at float32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def compare(model, reference: dict) -> dict:
    import torch

    config = model.config
    ids = reference["input_ids"].long()
    pixels = reference["pixel_values"]
    if isinstance(pixels, dict):
        pixels = torch.cat([pixels[k] for k in sorted(pixels, key=lambda k: ("dino" not in k, k))], dim=1)
    image = torch.full((ids.shape[0], config.num_image_tokens), config.image_token_id, dtype=torch.long)
    with torch.no_grad():
        dtype = next(model.parameters()).dtype
        logits = model(input_ids=torch.cat([image, ids], dim=1), pixel_values=pixels.to(dtype)).logits.float()
    expected = reference["logits"].float()
    if expected.shape[1] == ids.shape[1]:  # text positions only
        logits = logits[:, config.num_image_tokens:]
    if logits.shape != expected.shape:
        raise ValueError(f"logits shape {list(logits.shape)} vs reference {list(expected.shape)}")
    diff = (logits - expected).abs()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "argmax_agreement": (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="converted model folder (or Hub repo id)")
    parser.add_argument("--reference", required=True, help=".pt file with input_ids, pixel_values and logits")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="float32", help="dtype to run the model in")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--atol", type=float, default=1e-2, help="largest accepted absolute difference")
    args = parser.parse_args(argv)
    from transformers import AutoModelForImageTextToText

    reference = common.load_torch_checkpoint(args.reference)
    model = AutoModelForImageTextToText.from_pretrained(
        args.model, trust_remote_code=True, dtype=common.DTYPES[args.dtype]).to(args.device).eval()
    reference = {k: ({n: t.to(args.device) for n, t in v.items()} if isinstance(v, dict) else v.to(args.device))
                 for k, v in reference.items()}
    result = compare(model, reference)
    print(" ".join(f"{k}={v:.6g}" for k, v in result.items()))
    if result["max_abs_diff"] > args.atol:
        common.fail(f"max abs difference {result['max_abs_diff']:.4g} exceeds --atol {args.atol}")
    print("OK")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
