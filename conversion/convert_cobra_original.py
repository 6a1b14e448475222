#!/usr/bin/env python
"""Convert Cobra's released checkpoint (Mamba-1 LM, MLP connector) into a transformers folder with its own code.

    python conversion/convert_cobra_original.py --checkpoint cobra+3b/checkpoints/latest-checkpoint.pt --output cobra-3b

Cobra (the Mamba-1 predecessor of ML-Mamba) has the same towers and prompt; its connector is the projector alone
(2176 → 8704 → 2560 → 2560 with GELU between), its LM Mamba 2.8B Zephyr under an `llm.` prefix (SPEC §4).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import COBRA_KEY_TABLE, COBRA_LM_HEAD, COBRA_SECTIONS, EMBEDDING_KEY, ConversionError  # noqa: E402

DEFAULT_CHECKPOINT = "han1997/cobra:cobra+3b/checkpoints/latest-checkpoint.pt"
# mamba_ssm spells the embedding `embedding`, transformers `embeddings`: both are read.
_ALIASES = {"llm_backbone/llm.backbone.embedding.weight": "llm_backbone/llm.backbone.embeddings.weight"}


def convert(checkpoint, towers, image_size=384, image_token_id=50277):
    """(config, state dict in our names) from Cobra's checkpoint and the pretrained towers."""
    path = common.resolve_file(str(checkpoint), "latest-checkpoint.pt")
    sections = common.original_model_sections(common.load_torch_checkpoint(path), path, COBRA_SECTIONS)
    source = {_ALIASES.get(k, k): v for k, v in common.flatten_sections(sections).items()}
    for needed in ("llm_backbone/llm.backbone.embeddings.weight", "projector/projector.0.weight"):
        if needed not in source:
            raise ConversionError(f"{path}: missing ({needed}); cannot read the model's shapes")
    lm = {k.partition("/")[2]: v for k, v in source.items() if k.startswith("llm_backbone/")}
    text_config = common.mamba1_config_from_state_dict(lm, "llm.backbone.", "llm.backbone.embeddings.weight")
    loaded = common.load_towers(towers, image_size)
    config = common.build_config(
        [c for c, _ in loaded], text_config, image_token_id=image_token_id, connector_type="mlp",
        use_pre_connector=False, projector_hidden_size=source["projector/projector.0.weight"].shape[0],
    )
    expected = common.expected_shapes(common.meta_model(config))
    lm_head = source.pop(COBRA_LM_HEAD, None)
    table = common.forward_table(COBRA_KEY_TABLE)
    ours = common.map_checked(
        source, {k: s for k, s in expected.items() if not k.startswith("model.vision_towers.")},
        lambda k: common.rename(k, table), f"{path}",
    )
    common.check_and_tie_lm_head(lm_head, ours[EMBEDDING_KEY], COBRA_LM_HEAD)
    ours.update(common.towers_state_dict(towers, loaded, expected))
    return config, ours


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help="Cobra's latest-checkpoint.pt: a local path, or REPO_ID[:FILE] (default: %(default)s)")
    parser.add_argument("--output", required=True, help="folder to write (appears whole or not at all)")
    common.add_common_arguments(parser)
    parser.add_argument("--image-token-id", type=int, default=50277, help="id of <image> (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        config, state_dict = convert(args.checkpoint, args.towers, args.image_size, args.image_token_id)
        out = common.write_model_folder(
            args.output, config, state_dict, dtype=common.DTYPES[args.dtype], tokenizer=common.tokenizer_arg(args.tokenizer),
            overwrite=args.overwrite, max_shard_size=args.max_shard_size,
            card_fields=dict(model_name="Cobra", source=str(args.checkpoint), script=Path(__file__).name,
                             description="Cobra (Zhao et al., 2024): DINOv2 + SigLIP towers, MLP projector, "
                                         "Mamba 2.8B Zephyr language model, in the ML-Mamba code."),
        )
    except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as err:
        common.fail(str(err))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
