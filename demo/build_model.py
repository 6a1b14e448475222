"""Builds the demo's untrained starting point: a small ML-Mamba with a BPE tokenizer trained on the data's text.

    python demo/build_model.py --data data/shapes/train.json --out runs/shapes-init

The architecture is the released one at toy width: two vision towers (DINOv2 with registers + SigLIP, transformers'
own classes, 48 px, patch 8 → 6×6 = 36 image tokens), pre-connector, a two-layer Mamba-2 Scan Connector with the
bidirectional scan (BSM) and SwiGLU, the three-layer projector and a four-layer Mamba-2 language model. Everything is
randomly initialised (seeded): `recipes/finetune.py --mode full` then trains all but the towers, which stay as
random feature extractors, frozen as in every original training stage.

The tokenizer is a byte-level BPE like GPT-NeoX's: `<|endoftext|>` is id 0 (EOS and PAD, no BOS), any byte is
representable, merges are learnt from the training conversations rendered in the Zephyr prompt format, and
`<image>` is an added special token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaProcessor

IMAGE_SIZE, PATCH_SIZE = 48, 8
BPE_VOCAB_SIZE = 512  # 1 special + 256 bytes + 255 merges; `<image>` comes on top, id 512


def vision_configs() -> list[dict]:
    """Feature layer -2 of three: the towers run two blocks each (the third, like the released ones', is not built)."""
    return [
        dict(model_type="dinov2_with_registers", hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
             mlp_ratio=2, num_register_tokens=4, patch_size=PATCH_SIZE, image_size=IMAGE_SIZE),
        dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=3,
             num_attention_heads=4, patch_size=PATCH_SIZE, image_size=IMAGE_SIZE),
    ]


def text_config(vocab_size: int, num_layers: int = 4, width: int = 256) -> dict:
    return dict(model_type="mamba2", vocab_size=vocab_size, hidden_size=width, num_hidden_layers=num_layers,
                state_size=32, expand=2, head_dim=32, num_heads=2 * width // 32, n_groups=1, conv_kernel=4, chunk_size=64,
                tie_word_embeddings=True, pad_token_id=0, eos_token_id=0, bos_token_id=0)


def conversation_texts(llava_file: Path) -> list[str]:
    """The training conversations as the chat template renders them (without the image)."""
    texts = []
    for record in json.loads(llava_file.read_text()):
        parts = []
        for turn in record["conversations"]:
            value = turn["value"].replace("<image>", "").strip()
            if turn["from"] == "human":
                parts.append(("\n" if parts else "") + f"<|user|>\n{value}<|endoftext|>\n<|assistant|>\n")
            else:
                parts.append(f"{value}<|endoftext|>")
        texts.append("".join(parts))
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = BPE_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=2048,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.convert_tokens_to_ids("<|endoftext|>") != 0:
        raise RuntimeError("<|endoftext|> must be id 0 (EOS and PAD, as GPT-NeoX's)")
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="LLaVA training file (demo/make_data.py's train.json)")
    parser.add_argument("--out", type=Path, required=True, help="output model folder")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument("--lm-layers", type=int, default=4, help="Mamba-2 blocks of the language model (default 4)")
    parser.add_argument("--lm-width", type=int, default=256, help="the language model's d_model (default 256)")
    args = parser.parse_args(argv)

    tokenizer = train_tokenizer(conversation_texts(args.data))
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vocab_size = -(-len(tokenizer) // 16) * 16  # padded to a multiple of 16, as the released LM's embedding is
    config = MLMambaConfig(
        vision_config=vision_configs(),
        text_config=text_config(vocab_size, args.lm_layers, args.lm_width),
        connector_type="msc",
        scan_type="bsm",
        connector_num_layers=2,
        connector_hidden_size=128,
        connector_head_dim=32,
        connector_state_size=32,
        connector_chunk_size=64,
        image_token_id=image_token_id,
    )
    torch.manual_seed(args.seed)
    model = MLMambaForConditionalGeneration(config)
    processor = MLMambaProcessor.from_model_config(config, tokenizer)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    towers = sum(p.numel() for p in model.model.vision_towers.parameters())
    print(f"{args.out}: {n:,} parameters ({towers:,} in the frozen towers), vocabulary {len(tokenizer)} "
          f"(embedding {vocab_size}), {config.num_image_tokens} image tokens per image")


if __name__ == "__main__":
    main()
