"""The processor as a specification: the original Zephyr prompt byte for byte, image placeholders, training labels,
image preprocessing, saving and loading, and clear errors on bad input.

References are written by hand from SPEC §2 / §3 (strings, counts, pixel values), never taken from the processor.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch

from modeling_mlmamba import MLMambaConfig, MLMambaImageProcessor, MLMambaProcessor
from tests.tiny import TINY_IMAGE_TOKEN_ID, tiny_config, tiny_model, tiny_processor, tiny_tokenizer, tiny_vision_configs

N_IMG = 16  # tiny towers: 32 px images, patch 8 → 4 × 4 image tokens per image
IMAGE = TINY_IMAGE_TOKEN_ID
EOS = 0
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def user(text, image=False, payload=None):
    content = []
    if image:
        content.append({"type": "image"} if payload is None else {"type": "image", "image": payload})
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def solid(color=(255, 0, 0), size=(50, 40), mode="RGB"):
    return PIL.Image.new(mode, size, color)


@pytest.fixture
def processor():
    return tiny_processor()


def ids(processor, text):
    """Token ids of a hand-written string (the tokenizer alone, no processor logic)."""
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# The chat template reproduces the original prompt (SPEC §2)
# ---------------------------------------------------------------------------------------------------------------
def test_template_single_turn_with_image(processor):
    prompt = processor.apply_chat_template([user("What is in the image?", image=True)], add_generation_prompt=True)
    assert prompt == "<image><|user|>\nWhat is in the image?<|endoftext|>\n<|assistant|>\n"


def test_template_single_turn_text_only(processor):
    prompt = processor.apply_chat_template([user("Tell me a joke.")], add_generation_prompt=True)
    assert prompt == "<|user|>\nTell me a joke.<|endoftext|>\n<|assistant|>\n"
    # string content works the same
    prompt = processor.apply_chat_template([{"role": "user", "content": "Tell me a joke."}], add_generation_prompt=True)
    assert prompt == "<|user|>\nTell me a joke.<|endoftext|>\n<|assistant|>\n"


def test_template_without_generation_prompt_stops_after_the_user_turn(processor):
    prompt = processor.apply_chat_template([user("Hi")], add_generation_prompt=False)
    assert prompt == "<|user|>\nHi<|endoftext|>\n"


def test_template_two_turns_with_image(processor):
    conversation = [user("What is it?", image=True), assistant("A cat."), user("What colour?")]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == (
        "<image><|user|>\nWhat is it?<|endoftext|>\n<|assistant|>\nA cat.<|endoftext|>"
        "\n<|user|>\nWhat colour?<|endoftext|>\n<|assistant|>\n"
    )


def test_template_two_turns_text_only_full_conversation(processor):
    conversation = [user("q1"), assistant("a1"), user("q2"), assistant("a2")]
    prompt = processor.apply_chat_template(conversation)
    assert prompt == (
        "<|user|>\nq1<|endoftext|>\n<|assistant|>\na1<|endoftext|>\n<|user|>\nq2<|endoftext|>\n<|assistant|>\na2<|endoftext|>"
    )


def test_template_follows_the_original_text_cleanup(processor):
    # LLaVA-style "<image>\n" in the text is removed and the text stripped; the image still goes first; system ignored
    conversation = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<image>\n  Describe it. "}]},
        {"role": "assistant", "content": ""},
    ]
    prompt = processor.apply_chat_template(conversation)
    assert prompt == "<image><|user|>\nDescribe it.<|endoftext|>\n<|assistant|>\n <|endoftext|>"


def test_template_puts_every_image_of_the_conversation_before_the_prompt(processor):
    conversation = [user("first", image=True), assistant("ok"), user("second", image=True)]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == (
        "<image><image><|user|>\nfirst<|endoftext|>\n<|assistant|>\nok<|endoftext|>"
        "\n<|user|>\nsecond<|endoftext|>\n<|assistant|>\n"
    )


def test_tokenized_chat_template_loads_the_images(processor, tmp_path):
    path = tmp_path / "red.png"
    solid().save(path)
    out = processor.apply_chat_template(
        [user("what is it ?", image=True, payload=str(path))],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )
    expected = [IMAGE] * N_IMG + ids(processor, "<|user|>\nwhat is it ?<|endoftext|>\n<|assistant|>\n")
    assert out["input_ids"].tolist() == [expected]
    assert out["attention_mask"].tolist() == [[1] * len(expected)]
    assert out["pixel_values"].shape == (1, 6, 32, 32) and out["pixel_values"].dtype == torch.float32


def test_assistant_mask_covers_answers_and_their_eos(processor):
    conversation = [user("q1", image=True, payload=solid()), assistant("a cat")]
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    prompt_ids = [IMAGE] * N_IMG + ids(processor, "<|user|>\nq1<|endoftext|>\n<|assistant|>\n")
    answer_ids = ids(processor, "a cat<|endoftext|>")
    assert out["input_ids"][0] == prompt_ids + answer_ids
    assert out["assistant_masks"][0] == [0] * len(prompt_ids) + [1] * len(answer_ids)


# ---------------------------------------------------------------------------------------------------------------
# Placeholders
# ---------------------------------------------------------------------------------------------------------------
def test_each_placeholder_expands_to_the_image_token_count(processor):
    out = processor(images=[solid(), solid()], text="<image> and <image> what ?", return_tensors="pt")
    input_ids = out["input_ids"][0].tolist()
    assert input_ids.count(IMAGE) == 2 * 16
    first = input_ids.index(IMAGE)
    assert first == 0 and input_ids[:16] == [IMAGE] * 16 and input_ids[16] != IMAGE
    assert out["pixel_values"].shape == (2, 6, 32, 32)
    assert processor.num_image_tokens == 16 and processor.image_token == "<image>" and processor.image_token_id == 127


def test_images_without_placeholder_go_first(processor):
    out = processor(images=solid(), text="what is in the image ?", return_tensors="pt")
    assert out["input_ids"][0].tolist() == [IMAGE] * 16 + ids(processor, "what is in the image ?")


def test_batch_without_placeholders_one_image_per_text_left_padded(processor):
    out = processor(images=[solid(), solid((0, 0, 255))], text=["a cat", "what is the dog doing ?"],
                    return_tensors="pt", padding=True)
    short, long = ids(processor, "a cat"), ids(processor, "what is the dog doing ?")
    width = 16 + len(long)
    pad = width - 16 - len(short)
    assert out["input_ids"].tolist() == [[EOS] * pad + [IMAGE] * 16 + short, [IMAGE] * 16 + long]
    assert out["attention_mask"].tolist() == [[0] * pad + [1] * (16 + len(short)), [1] * width]
    assert out["pixel_values"].shape == (2, 6, 32, 32)


def test_images_listed_per_text(processor):
    out = processor(images=[[solid(), solid()], []], text=["two", "none"], return_tensors="pt", padding=True)
    rows = out["input_ids"].tolist()
    assert rows[0].count(IMAGE) == 32 and rows[1].count(IMAGE) == 0
    assert out["pixel_values"].shape[0] == 2


def test_placeholder_is_one_special_token_even_in_runs(processor):
    assert ids(processor, "<image><image><image>") == [IMAGE] * 3


# ---------------------------------------------------------------------------------------------------------------
# Training examples (SPEC §2)
# ---------------------------------------------------------------------------------------------------------------
def test_training_labels_mask_user_turns_and_image_positions(processor):
    conversation = [user("what is it ?", image=True), assistant("a cat"), user("more ?"), assistant("it is red")]
    example = processor.build_training_example(conversation, images=[solid()])
    user1 = ids(processor, "<|user|>\nwhat is it ?<|endoftext|>\n<|assistant|>\n")
    answer1 = ids(processor, "a cat<|endoftext|>")
    user2 = ids(processor, "\n<|user|>\nmore ?<|endoftext|>\n<|assistant|>\n")
    answer2 = ids(processor, "it is red<|endoftext|>")
    assert example["input_ids"].tolist() == [IMAGE] * 16 + user1 + answer1 + user2 + answer2
    assert example["labels"].tolist() == (
        [-100] * 16 + [-100] * len(user1) + answer1 + [-100] * len(user2) + answer2
    )
    assert answer1[-1] == EOS and answer2[-1] == EOS  # the answers' <|endoftext|> is supervised
    assert example["attention_mask"].tolist() == [1] * len(example["input_ids"])
    assert example["pixel_values"].shape == (1, 6, 32, 32)
    for key in ("input_ids", "labels", "attention_mask"):
        assert example[key].dtype == torch.long and example[key].ndim == 1


def test_training_example_matches_the_rendered_template(processor):
    conversation = [user("q", image=True, payload=solid()), assistant("a")]
    example = processor.build_training_example(conversation)
    text = "<|user|>\nq<|endoftext|>\n<|assistant|>\na<|endoftext|>"
    assert example["input_ids"].tolist() == [IMAGE] * 16 + ids(processor, text)


def test_text_only_training_example(processor):
    example = processor.build_training_example([user("hi"), assistant("yes")])
    prompt = ids(processor, "<|user|>\nhi<|endoftext|>\n<|assistant|>\n")
    answer = ids(processor, "yes<|endoftext|>")
    assert example["pixel_values"] is None
    assert example["labels"].tolist() == [-100] * len(prompt) + answer


def test_training_text_is_truncated_and_image_tokens_come_on_top(processor):
    example = processor.build_training_example([user("what is in the image ?"), assistant("a cat")],
                                               images=[solid()], max_length=5)
    assert len(example["input_ids"]) == 16 + 5
    assert example["labels"].tolist() == [-100] * 21


def test_llava_turns_convert_to_messages(processor):
    messages = MLMambaProcessor.messages_from_llava(
        [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    )
    example = processor.build_training_example(messages, images=[solid()])
    text = "<|user|>\nWhat is it?<|endoftext|>\n<|assistant|>\nA cat.<|endoftext|>"
    assert example["input_ids"].tolist() == [IMAGE] * 16 + ids(processor, text)


def test_collate_right_pads_and_concatenates_images(processor):
    with_image = processor.build_training_example([user("q", image=True), assistant("a cat")], images=[solid()])
    text_only = processor.build_training_example([user("what is it ?"), assistant("yes")])
    long_ = max(len(with_image["input_ids"]), len(text_only["input_ids"]))
    batch = processor.collate_training_examples([text_only, with_image])
    n = len(text_only["input_ids"])
    assert batch["input_ids"][0].tolist() == text_only["input_ids"].tolist() + [EOS] * (long_ - n)
    assert batch["labels"][0].tolist() == text_only["labels"].tolist() + [-100] * (long_ - n)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (long_ - n)
    assert batch["pixel_values"].shape == (1, 6, 32, 32)
    assert processor.collate_training_examples([text_only])["pixel_values"] is None
    loss = tiny_model()(**batch).loss
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------------------------
# Image preprocessing (SPEC §3)
# ---------------------------------------------------------------------------------------------------------------
def expected_solid(rgb, mean, std):
    return [(c / 255 - m) / s for c, m, s in zip(rgb, mean, std)]


def test_towers_are_stacked_on_channels_with_their_own_normalisation(processor):
    pixels = processor.image_processor(solid((255, 128, 0)))["pixel_values"]
    assert pixels.shape == (1, 6, 32, 32) and pixels.dtype == torch.float32
    dino = expected_solid((255, 128, 0), DINO_MEAN, DINO_STD)
    siglip = expected_solid((255, 128, 0), (0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(pixels[0].mean((1, 2)), torch.tensor(dino + siglip), atol=1e-5, rtol=0)


def test_resize_naive_is_pil_bicubic_without_crop(processor):
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))
    reference = np.asarray(image.resize((32, 32), PIL.Image.BICUBIC), dtype=np.float32) / 255.0
    pixels = processor.image_processor(image)["pixel_values"][0].numpy()
    np.testing.assert_allclose(pixels[3:], ((reference - 0.5) / 0.5).transpose(2, 0, 1), atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: solid((255, 0, 0, 0), mode="RGBA"),
        lambda: solid((255, 0, 0)).convert("P"),
        lambda: np.full((40, 50, 3), (255, 0, 0), dtype=np.uint8),
        lambda: np.full((3, 40, 50), 0.0, dtype=np.float32) + np.array([1.0, 0, 0], np.float32)[:, None, None],
        lambda: torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 40, 50).clone(),
        lambda: torch.full((40, 50, 3), 0, dtype=torch.uint8) + torch.tensor([255, 0, 0], dtype=torch.uint8),
    ],
    ids=["rgba", "palette", "numpy-hwc-uint8", "numpy-chw-float", "torch-chw-float", "torch-hwc-uint8"],
)
def test_every_input_kind_gives_the_same_red_image(processor, make):
    pixels = processor.image_processor(make())["pixel_values"][0]
    red = expected_solid((255, 0, 0), DINO_MEAN, DINO_STD) + expected_solid((255, 0, 0), (0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(pixels.mean((1, 2)), torch.tensor(red), atol=1e-5, rtol=0)
    assert float(pixels.std((1, 2)).max()) < 1e-5


def test_grayscale_becomes_three_equal_channels(processor):
    pixels = processor.image_processor(solid(100, mode="L"))["pixel_values"][0]
    torch.testing.assert_close(pixels[3:].mean((1, 2)), torch.full((3,), (100 / 255 - 0.5) / 0.5), atol=1e-5, rtol=0)


def test_exif_orientation_is_honoured(processor, tmp_path):
    # stored 40 wide × 20 high, left half red, right half blue; orientation 6 = display rotated 90° clockwise,
    # so the upright image is 20 × 40 with red on top
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    image = PIL.Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=100)
    for source in (str(path), PIL.Image.open(path)):
        siglip_red = processor.image_processor(source)["pixel_values"][0, 3]  # red channel of the SigLIP copy
        assert float(siglip_red[:12].mean()) > 0.9 and float(siglip_red[-12:].mean()) < -0.9


def test_letterbox_pads_with_each_towers_mean_colour():
    image_processor = MLMambaImageProcessor(size=32, image_resize_strategy="letterbox")
    tall = solid((255, 255, 255), size=(16, 32))  # 16 wide: 8 columns of padding either side
    pixels = image_processor(tall)["pixel_values"][0]
    # the padding is the mean colour (int(mean·255)/255), which normalises to (almost) zero, per tower
    dino_pad = [(int(m * 255) / 255 - m) / s for m, s in zip(DINO_MEAN, DINO_STD)]
    torch.testing.assert_close(pixels[:3, :, 0], torch.tensor(dino_pad)[:, None].expand(3, 32), atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[3:, :, 0], torch.full((3, 32), (127 / 255 - 0.5) / 0.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[3:, :, 16], torch.ones(3, 32), atol=1e-5, rtol=0)  # the white image


def test_image_processor_from_model_config_uses_each_towers_statistics():
    towers = tiny_vision_configs()
    towers[1] = dict(model_type="clip_vision_model", hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                     num_attention_heads=2, patch_size=8, image_size=32)
    image_processor = MLMambaImageProcessor.from_model_config(tiny_config(vision_config=towers))
    assert image_processor.size == {"height": 32, "width": 32}
    assert image_processor.image_mean == [[0.485, 0.456, 0.406], [0.48145466, 0.4578275, 0.40821073]]
    assert image_processor.image_std == [[0.229, 0.224, 0.225], [0.26862954, 0.26130258, 0.27577711]]
    released = MLMambaImageProcessor.from_model_config(MLMambaConfig())
    assert released.size == {"height": 384, "width": 384} and released.resample == PIL.Image.BICUBIC
    assert released.image_mean == [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]]
    assert released.image_resize_strategy == "resize-naive"


def test_processor_adds_the_image_token_as_a_special_token():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from tests.tiny import _tiny_tokenizer_json

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()), eos_token="<|endoftext|>")
    assert len(bare) == 127 and "<image>" not in bare.get_vocab()
    processor = MLMambaProcessor.from_model_config(tiny_config(), bare)  # the next id: 127, the config's
    assert processor.image_token_id == 127 and "<image>" in bare.all_special_tokens
    assert bare("<image><image>x<image>", add_special_tokens=False)["input_ids"][:2] == [127, 127]
    assert bare.pad_token_id == 0 and bare.padding_side == "left"


def test_processor_checks_the_image_token_id_against_the_config():
    with pytest.raises(ValueError, match="image_token_id is 5"):
        MLMambaProcessor.from_model_config(tiny_config(image_token_id=5), tiny_tokenizer())


# ---------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------
def test_decoding_gives_clean_answers(processor):
    answer = ids(processor, "a cat")
    generated = torch.tensor([[EOS, EOS] + [IMAGE] * 16 + ids(processor, "<|user|>\nq<|endoftext|>\n<|assistant|>\n")
                              + answer + [EOS, EOS]])
    prompt_len = generated.shape[1] - len(answer) - 2
    assert processor.batch_decode(generated[:, prompt_len:], skip_special_tokens=True) == ["a cat"]
    assert processor.post_process_image_text_to_text(generated[:, prompt_len:]) == ["a cat"]
    full = processor.post_process_image_text_to_text(generated)
    assert full == ["<|user|>\nq\n<|assistant|>\na cat"]
    # without skipping special tokens, an image shows as one placeholder, not 16
    assert processor.decode(generated[0, 2:20]).count("<image>") == 1


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------
def test_save_and_load_offline_in_a_fresh_process(processor, tmp_path):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    processor.save_pretrained(folder)
    for name in ("processor_config.json", "tokenizer_config.json"):
        assert json.loads((folder / name).read_text())["auto_map"]["AutoProcessor"] == "processing_mlmamba.MLMambaProcessor"
    for name in ("processing_mlmamba.py", "image_processing_mlmamba.py", "chat_template.jinja"):
        assert (folder / name).is_file()
    solid().save(tmp_path / "red.png")

    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoProcessor
        assert not any(m.startswith("modeling_mlmamba") for m in sys.modules)
        p = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert "modeling_mlmamba" not in sys.modules
        conversation = [{{"role": "user", "content": [{{"type": "image", "image": {str(tmp_path / "red.png")!r}}},
                                                     {{"type": "text", "text": "what is it ?"}}]}}]
        text = p.apply_chat_template(conversation, add_generation_prompt=True)
        out = p.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt")
        torch.save({{"input_ids": out["input_ids"], "pixel_values": out["pixel_values"]}}, "out.pt")
        json.dump({{"text": text, "class": type(p).__name__, "padding_side": p.tokenizer.padding_side,
                   "num_image_tokens": p.num_image_tokens, "image_token_id": p.image_token_id}}, open("out.json", "w"))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "out.json").read_text())
    assert info == {
        "text": "<image><|user|>\nwhat is it ?<|endoftext|>\n<|assistant|>\n", "class": "MLMambaProcessor",
        "padding_side": "left", "num_image_tokens": 16, "image_token_id": 127,
    }
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["input_ids"][0].tolist() == [IMAGE] * 16 + ids(processor, "<|user|>\nwhat is it ?<|endoftext|>\n<|assistant|>\n")
    red = expected_solid((255, 0, 0), DINO_MEAN, DINO_STD) + expected_solid((255, 0, 0), (0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(out["pixel_values"][0].mean((1, 2)), torch.tensor(red), atol=1e-5, rtol=0)


def test_installed_package_registers_the_processor_auto_classes(processor, tmp_path):
    from transformers import AutoImageProcessor, AutoProcessor

    tiny_model().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MLMambaProcessor
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), MLMambaImageProcessor)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: clear errors
# ---------------------------------------------------------------------------------------------------------------
def test_missing_image_file_names_the_file(processor, tmp_path):
    missing = str(tmp_path / "nowhere.png")
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        processor(images=missing, text="what ?")
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        processor.build_training_example([user("q", image=True, payload=missing), assistant("a")])
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        processor.apply_chat_template([user("q", image=True, payload=missing)], tokenize=True, return_dict=True)


def test_corrupt_image_file_names_the_file(processor, tmp_path):
    buffer = io.BytesIO()
    solid().save(buffer, format="PNG")
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    for path in (corrupt, not_an_image):
        with pytest.raises(ValueError, match=path.name):
            processor(images=str(path), text="what ?")


def test_more_placeholders_than_images(processor):
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\).*1 image"):
        processor(images=[solid()], text="<image><image> what ?")
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\).*no images"):
        processor(text="<image> what ?")
    with pytest.raises(ValueError, match=r"2 image entries but 1 image"):
        processor.build_training_example(
            [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]},
             assistant("a")],
            images=[solid()],
        )


def test_more_images_than_placeholders(processor):
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\).*3 image"):
        processor(images=[solid(), solid(), solid()], text="<image> what ?")
    with pytest.raises(ValueError, match=r"3 image\(s\) for 2 texts"):
        processor(images=[solid(), solid(), solid()], text=["a", "b"])
    with pytest.raises(ValueError, match=r"1 image entries but 2 image"):
        processor.build_training_example([user("q", image=True), assistant("a")], images=[solid(), solid()])


def test_empty_conversation(processor):
    with pytest.raises(ValueError, match="non-empty list of messages"):
        processor.apply_chat_template([])
    with pytest.raises(ValueError, match="non-empty list of messages"):
        processor.build_training_example([])
    with pytest.raises(ValueError, match="only system messages"):
        processor.build_training_example([{"role": "system", "content": "be brief"}])


def test_training_conversation_must_alternate_and_end_with_an_answer(processor):
    with pytest.raises(ValueError, match="should be 'assistant' but is 'user'"):
        processor.build_training_example([user("a"), user("b")])
    with pytest.raises(ValueError, match="end with an assistant answer"):
        processor.build_training_example([user("a")])


def test_non_image_object_where_an_image_is_expected(processor):
    with pytest.raises(ValueError, match="got a builtins.int"):
        processor(images=42, text="what ?")
    with pytest.raises(ValueError, match="holds a dict, not an image"):
        processor.apply_chat_template([user("q", image=True, payload={"x": 1})], tokenize=True)
    with pytest.raises(ValueError, match="got a builtins.object"):
        processor.build_training_example([user("q"), assistant("a")], images=[object()])
