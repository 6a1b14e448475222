"""Tiny ML-Mamba building blocks for the tests: every test builds its model, tokenizer and images itself."""

from __future__ import annotations

import torch

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration

TINY_IMAGE_SIZE = 32
TINY_PATCH = 8  # 4×4 = 16 image tokens per image
TINY_VOCAB = 128
TINY_IMAGE_TOKEN_ID = TINY_VOCAB - 1


def tiny_vision_configs(image_size: int = TINY_IMAGE_SIZE, patch_size: int = TINY_PATCH) -> list[dict]:
    """DINOv2-with-registers + SigLIP, as released, at toy width."""
    return [
        dict(model_type="dinov2_with_registers", hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
             num_register_tokens=4, patch_size=patch_size, image_size=image_size, mlp_ratio=2),
        dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=2, patch_size=patch_size, image_size=image_size),
    ]


def tiny_text_config(vocab_size: int = TINY_VOCAB, **overrides) -> dict:
    """A two-layer Mamba-2 with the released model's structure (1 group, conv 4, tied embeddings, EOS = PAD = 0)."""
    cfg = dict(model_type="mamba2", vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, state_size=16,
               expand=2, head_dim=16, num_heads=4, n_groups=1, conv_kernel=4, chunk_size=8,
               tie_word_embeddings=True, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    cfg.update(overrides)
    return cfg


def tiny_config(**overrides) -> MLMambaConfig:
    kwargs = dict(vision_config=tiny_vision_configs(), text_config=tiny_text_config(),
                  image_token_id=TINY_IMAGE_TOKEN_ID)
    kwargs.update(overrides)
    return MLMambaConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> MLMambaForConditionalGeneration:
    torch.manual_seed(seed)
    return MLMambaForConditionalGeneration(tiny_config(**overrides)).eval()


def image_prompt_ids(config: MLMambaConfig, text_ids: list[int], num_images: int = 1) -> torch.LongTensor:
    """`num_images` runs of image tokens followed by text ids, as the processor lays them out."""
    return torch.tensor([[config.image_token_id] * (config.num_image_tokens * num_images) + list(text_ids)])
