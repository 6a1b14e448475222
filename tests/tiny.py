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


# ---- tokenizer and processor ---------------------------------------------------------------------------------
# A byte-level BPE as GPT-NeoX's (no BOS; `<|endoftext|>` = id 0 = EOS = PAD), trained in the test process on a
# corpus full of the Zephyr chat markers so that prompts tokenize to few tokens. `<image>` is an added special
# token with id TINY_IMAGE_TOKEN_ID (127), inside the tiny model's 128-row embedding.
TINY_CORPUS_WORDS = (
    "what is in the image ? describe this picture . a cat sits on a red mat , the dog runs ! "
    "how many birds are there ? two . yes no it is blue green white black 0 1 2 3 4 5 6 7 8 9 "
    "The Quick Brown Fox Jumps Over A Lazy Dog ' : - tell me more about it and then what ? "
    "JUMPING WIZARDS VEX QUICK BOX FOG"
)


def _tiny_tokenizer_json() -> str:
    global _TINY_TOKENIZER_JSON
    if _TINY_TOKENIZER_JSON is None:
        import string

        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        corpus = []
        words = TINY_CORPUS_WORDS.split()
        for i in range(40):
            q = " ".join(words[(i * 7) % len(words) : (i * 7) % len(words) + 6])
            a = " ".join(words[(i * 5 + 3) % len(words) : (i * 5 + 3) % len(words) + 4])
            corpus.append(f"<|user|>\n{q}<|endoftext|>\n<|assistant|>\n{a}<|endoftext|>\n")
        corpus.append(TINY_CORPUS_WORDS)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=TINY_IMAGE_TOKEN_ID, special_tokens=["<|endoftext|>"], show_progress=False,
            # letters, digits, space (Ġ), newline (Ċ) and some punctuation: other characters are dropped
            initial_alphabet=list(string.ascii_letters + string.digits + ".,?!':-<|>") + ["Ġ", "Ċ"],
        )
        tok.train_from_iterator(corpus, trainer=trainer)
        if tok.get_vocab_size() != TINY_IMAGE_TOKEN_ID:
            raise RuntimeError(f"tiny BPE has {tok.get_vocab_size()} tokens, expected {TINY_IMAGE_TOKEN_ID}")
        _TINY_TOKENIZER_JSON = tok.to_str()
    return _TINY_TOKENIZER_JSON


_TINY_TOKENIZER_JSON = None


def tiny_tokenizer():
    """A fresh tiny GPT-NeoX-like tokenizer (training is cached; each call returns a new object)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=2048,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == TINY_IMAGE_TOKEN_ID
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0 and tokenizer.bos_token is None
    return tokenizer


def tiny_processor(config: MLMambaConfig | None = None):
    """`MLMambaProcessor` for a tiny config (default `tiny_config()`): 32 px images, 16 image tokens each."""
    from modeling_mlmamba import MLMambaProcessor

    return MLMambaProcessor.from_model_config(config if config is not None else tiny_config(), tiny_tokenizer())
