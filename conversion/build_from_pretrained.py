#!/usr/bin/env python
"""Build a new ML-Mamba from a pretrained Mamba-2 LM and vision towers, with a freshly initialised connector.

    python conversion/build_from_pretrained.py --lm state-spaces/mamba2-2.7b --output ml-mamba-init

The starting point for training with the recipes (align, then finetune). The LM is a transformers folder
(`Mamba2ForCausalLM` / `MambaForCausalLM`) or a mamba_ssm folder (`config.json` with `d_model`, `n_layer`, `ssm_cfg`;
`pytorch_model.bin` or safetensors), e.g. `state-spaces/mamba2-*`. Mamba-1 LMs are accepted too (Cobra-style models).
The connector shape follows the released model (pre-connector, 2-layer BSM MSC with SwiGLU, projector) unless changed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import ConversionError  # noqa: E402


def _read_lm_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        out = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{folder}: no *.safetensors or pytorch_model*.bin")
    out = {}
    for f in bins:
        out.update(common.load_torch_checkpoint(f))
    return out


def load_lm(path_or_repo: str, chunk_size: int | None = None):
    """(text config, LM tensors in our names, lm_head tensor or None) from a transformers or mamba_ssm folder."""
    folder = common.resolve_folder(path_or_repo)
    raw = json.loads((folder / "config.json").read_text())
    sd = _read_lm_tensors(folder)
    if "model_type" in raw:  # transformers layout: backbone.embeddings / backbone.layers / backbone.norm_f
        if raw["model_type"] not in ("mamba2", "mamba"):
            raise ConversionError(f"{folder}: a {raw['model_type']!r} model, expected mamba2 or mamba")
        from transformers import AutoConfig

        text_config = AutoConfig.from_pretrained(folder)
        embedding = "backbone.embeddings.weight"
        n_groups = getattr(text_config, "n_groups", 1)
    else:  # mamba_ssm layout: backbone.embedding / ssm_cfg
        embedding = "backbone.embedding.weight"
        text_config = None
        n_groups = raw.get("ssm_cfg", {}).get("ngroups", 1)
    layer = (raw.get("ssm_cfg") or {}).get("layer", "Mamba1")
    is_mamba2 = (text_config.model_type == "mamba2") if text_config is not None else layer == "Mamba2"
    if embedding not in sd:
        raise ConversionError(f"{folder}: no {embedding} among its tensors")
    # The shapes are the ground truth; the folder's config adds what shapes cannot show (eps, groups, chunk size).
    eps = getattr(text_config, "layer_norm_epsilon", raw.get("norm_epsilon", 1e-5))
    if is_mamba2:
        chunk = chunk_size or getattr(text_config, "chunk_size", None) or raw.get("ssm_cfg", {}).get("chunk_size", 256)
        text_config = common.mamba2_config_from_state_dict(sd, "backbone.", embedding, n_groups=n_groups,
                                                           chunk_size=chunk, layer_norm_epsilon=eps)
    else:
        text_config = common.mamba1_config_from_state_dict(sd, "backbone.", embedding, layer_norm_epsilon=eps)
    lm_head = sd.pop("lm_head.weight", None)
    ours = {}
    for key, tensor in sd.items():
        if key == embedding:
            ours["model.language_model.embeddings.weight"] = tensor
        elif key.startswith("backbone."):
            ours["model.language_model." + key[len("backbone."):]] = tensor
        else:
            ours[key] = tensor  # reported as unexpected by the check
    return text_config, ours, lm_head


def build(lm, towers, image_size=384, connector_type="msc", scan_type="bsm", connector_num_layers=2, seed=0,
          image_token_id=50277, chunk_size=None):
    text_config, lm_sd, lm_head = load_lm(lm, chunk_size)
    loaded = common.load_towers(towers, image_size)
    config = common.build_config([c for c, _ in loaded], text_config, image_token_id=image_token_id,
                                 connector_type=connector_type, scan_type=scan_type,
                                 connector_num_layers=connector_num_layers)
    expected = common.expected_shapes(common.meta_model(config))
    lm_expected = {k: s for k, s in expected.items() if k.startswith("model.language_model.")}
    ours = common.map_checked(lm_sd, lm_expected, lambda k: k, f"language model {lm}")
    common.check_and_tie_lm_head(lm_head, ours[common.EMBEDDING_KEY], "lm_head.weight")
    ours.update(common.fresh_connector_state_dict(config, seed=seed))
    ours.update(common.towers_state_dict(towers, loaded, expected))
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise ConversionError("missing: " + ", ".join(missing))
    return config, ours


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", required=True, help="Mamba-2 (or Mamba) LM: repo id or folder, transformers or mamba_ssm")
    parser.add_argument("--output", required=True, help="folder to write (appears whole or not at all)")
    common.add_common_arguments(parser)
    parser.add_argument("--connector-type", choices=["msc", "msc_basic", "mlp"], default="msc")
    parser.add_argument("--scan-type", choices=["bsm", "csm"], default="bsm")
    parser.add_argument("--connector-num-layers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None, help="override the LM's SSD chunk size")
    parser.add_argument("--image-token-id", type=int, default=50277, help="id of <image> (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the connector's initialisation")
    args = parser.parse_args(argv)
    try:
        config, state_dict = build(args.lm, args.towers, args.image_size, args.connector_type, args.scan_type,
                                   args.connector_num_layers, args.seed, args.image_token_id, args.chunk_size)
        out = common.write_model_folder(
            args.output, config, state_dict, dtype=common.DTYPES[args.dtype], tokenizer=common.tokenizer_arg(args.tokenizer),
            overwrite=args.overwrite, max_shard_size=args.max_shard_size,
            card_fields=dict(model_name=f"ML-Mamba (untrained connector) on {args.lm}", source=str(args.lm),
                             script=Path(__file__).name,
                             description="A starting point for training: pretrained LM and towers, connector freshly "
                                         "initialised. Not for use before training."),
        )
    except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as err:
        common.fail(str(err))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
