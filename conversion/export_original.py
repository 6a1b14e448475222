#!/usr/bin/env python
"""Export a transformers ML-Mamba (or Cobra) folder back to the original `.pt` layout (the reverse of the converters).

    python conversion/export_original.py --model ml-mamba-3b --output latest-checkpoint.pt

Writes `{"model": {section: {key: tensor}}}` as the original code base saves it (SPEC §4), float32 by default, with
`lm_head.weight` as a separate copy of the embedding; the vision towers are not part of it (the original loads them
from their pretrained repos). Converting the result again gives the same folder: the round trip is lossless.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import ConversionError  # noqa: E402


def load_folder_state_dict(folder: Path) -> dict:
    """Every tensor of a saved folder, as stored (no model is built)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors files")
    out = {}
    for f in common.tqdm(files, desc="reading shards", unit="shard"):
        out.update(load_file(str(f)))
    return out


def export(model_folder, dtype="float32") -> dict:
    folder = common.resolve_folder(str(model_folder))
    config = json.loads((folder / "config.json").read_text())
    cobra = config.get("connector_type") == "mlp" and config.get("text_config", {}).get("model_type") == "mamba"
    if not cobra and (config.get("connector_type") == "mlp" or config.get("scan_type") != "bsm"
                      or not config.get("use_pre_connector", True)):
        raise ConversionError(
            "the original layouts exist for the released ML-Mamba (pre-connector + BSM MSC) and Cobra (MLP, Mamba-1) "
            f"only; this folder has connector_type={config.get('connector_type')!r}, scan_type={config.get('scan_type')!r}"
        )
    table = common.COBRA_KEY_TABLE if cobra else common.MLMAMBA_KEY_TABLE
    lm_head = common.COBRA_LM_HEAD if cobra else common.MLMAMBA_LM_HEAD
    to_dtype = common.DTYPES[dtype]
    flat, unmapped = {}, []
    for key, tensor in load_folder_state_dict(folder).items():
        if key.startswith("model.vision_towers."):
            continue
        original = common.rename_reverse(key, table)
        if original is None:
            unmapped.append(key)
            continue
        flat[original] = tensor.to(to_dtype) if tensor.is_floating_point() else tensor
    if unmapped:
        raise ConversionError(f"{folder}: no original name for ({len(unmapped)}): " + ", ".join(sorted(unmapped)))
    embedding = common.rename_reverse(common.EMBEDDING_KEY, table)
    flat[lm_head] = flat[embedding].clone()
    return {"model": common.unflatten_sections(flat)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="converted model folder (or Hub repo id)")
    parser.add_argument("--output", required=True, help="the .pt file to write")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="float32",
                        help="dtype of the written tensors (the original stores float32; default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    import os
    import tempfile

    import torch

    output = Path(args.output).resolve()
    if output.exists() and not args.overwrite:
        common.fail(f"{output} exists; pass --overwrite to replace it")
    try:
        checkpoint = export(args.model, args.dtype)
    except (ConversionError, FileNotFoundError, ValueError) as err:
        common.fail(str(err))
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.tmp-", dir=output.parent)
    os.close(fd)
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, output)  # the file appears whole or not at all
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
