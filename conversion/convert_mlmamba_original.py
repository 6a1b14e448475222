#!/usr/bin/env python
"""Convert the authors' ML-Mamba checkpoint (`latest-checkpoint.pt`) into a transformers folder with its own code.

    python conversion/convert_mlmamba_original.py --checkpoint latest-checkpoint.pt --output ml-mamba-3b

The checkpoint holds the LM, pre-connector, MSC and projector (SPEC §4); the vision towers come from their pretrained
repos (or local folders), truncated at the feature layer, DINOv2's position table resampled to the 27×27 grid once.
Every tensor of the checkpoint must be used: missing, unexpected or mis-shaped keys stop the conversion with a list.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import (  # noqa: E402
    MLMAMBA_KEY_TABLE,
    MLMAMBA_LM_HEAD,
    MLMAMBA_SECTIONS,
    ConversionError,
    EMBEDDING_KEY,
)

DEFAULT_CHECKPOINT = "huangwenjun1994/ML-Mamba:latest-checkpoint.pt"


def msc_config_from_state_dict(sd: dict, n_groups: int = 1, chunk_size: int = 256) -> dict:
    """Connector settings read off the `mlp`, `bidirectional_mamba` and `projector` tensors."""
    p = "bidirectional_mamba/layers.0.mixer."
    hidden = sd[p + "in_proj.weight"].shape[1]
    d_inner = sd[p + "out_proj.weight"].shape[1]
    heads = sd[p + "A_log"].shape[0]
    conv_dim, _, kernel = sd[p + "conv1d.weight"].shape
    group_state = (conv_dim - d_inner) // 2
    return dict(
        connector_type="msc" if "bidirectional_mamba/layers.0.mlp.w1.weight" in sd else "msc_basic",
        scan_type="bsm",
        connector_num_layers=common._layer_count([k.partition("/")[2] for k in sd if k.startswith("bidirectional_mamba/")], "layers."),
        use_pre_connector=True,
        connector_hidden_size=sd["mlp/0.weight"].shape[0],
        projector_hidden_size=sd["projector/projector.0.weight"].shape[0],
        connector_expand=d_inner // hidden,
        connector_head_dim=d_inner // heads,
        connector_state_size=group_state // n_groups,
        connector_n_groups=n_groups,
        connector_conv_kernel=kernel,
        connector_chunk_size=chunk_size,
        connector_layer_norm_epsilon=1e-5,
    )


def convert(checkpoint, towers, image_size=384, n_groups=1, chunk_size=256, image_token_id=50277):
    """(config, state dict in our names) from the original checkpoint and the pretrained towers."""
    path = common.resolve_file(str(checkpoint), "latest-checkpoint.pt")
    sections = common.original_model_sections(common.load_torch_checkpoint(path), path, MLMAMBA_SECTIONS)
    source = common.flatten_sections(sections)
    for needed in ("llm_backbone/backbone.embedding.weight", "mlp/0.weight", "projector/projector.0.weight",
                   "bidirectional_mamba/layers.0.mixer.in_proj.weight"):
        if needed not in source:
            raise ConversionError(f"{path}: missing ({needed}); cannot read the model's shapes")
    lm = {k.partition("/")[2]: v for k, v in source.items() if k.startswith("llm_backbone/")}
    text_config = common.mamba2_config_from_state_dict(
        lm, "backbone.", "backbone.embedding.weight", n_groups=n_groups, chunk_size=chunk_size
    )
    loaded = common.load_towers(towers, image_size)
    config = common.build_config(
        [c for c, _ in loaded], text_config, image_token_id=image_token_id,
        **msc_config_from_state_dict(source, n_groups=n_groups, chunk_size=chunk_size),
    )
    expected = common.expected_shapes(common.meta_model(config))

    lm_head = source.pop(MLMAMBA_LM_HEAD, None)
    table = common.forward_table(MLMAMBA_KEY_TABLE)
    ours = common.map_checked(
        source, {k: s for k, s in expected.items() if not k.startswith("model.vision_towers.")},
        lambda k: common.rename(k, table), f"{path}",
    )
    common.check_and_tie_lm_head(lm_head, ours[EMBEDDING_KEY], MLMAMBA_LM_HEAD)
    ours.update(common.towers_state_dict(towers, loaded, expected))
    return config, ours


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help="latest-checkpoint.pt: a local path, or REPO_ID[:FILE] on the Hub (default: %(default)s)")
    parser.add_argument("--output", required=True, help="folder to write (appears whole or not at all)")
    common.add_common_arguments(parser)
    parser.add_argument("--n-groups", type=int, default=1, help="Mamba-2 B/C groups (not visible in shapes; default 1)")
    parser.add_argument("--chunk-size", type=int, default=256, help="Mamba-2 SSD chunk size (default: %(default)s)")
    parser.add_argument("--image-token-id", type=int, default=50277, help="id of <image> (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        config, state_dict = convert(args.checkpoint, args.towers, args.image_size, args.n_groups, args.chunk_size,
                                     args.image_token_id)
        out = common.write_model_folder(
            args.output, config, state_dict, dtype=common.DTYPES[args.dtype], tokenizer=common.tokenizer_arg(args.tokenizer),
            overwrite=args.overwrite, max_shard_size=args.max_shard_size,
            card_fields=dict(model_name="ML-Mamba", source=str(args.checkpoint), script=Path(__file__).name,
                             description="ML-Mamba (Huang & Hu, 2024, arXiv 2407.19832): DINOv2 + SigLIP towers, "
                                         "Mamba-2 Scan Connector, Mamba-2 2.7B language model."),
        )
    except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as err:
        common.fail(str(err))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
