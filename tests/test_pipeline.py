"""pipeline("image-text-to-text") end to end on a tiny saved model: chat messages, plain images + text, batches.

The reference for every answer is `model.generate` on hand-built token ids (image tokens, then the Zephyr prompt
written out by hand), decoded with the tokenizer alone.
"""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from transformers import pipeline

from tests.tiny import TINY_IMAGE_TOKEN_ID, tiny_model, tiny_processor

# min_new_tokens: the random tiny model would often stop at once; six tokens make answers tell inputs apart
GENERATE = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-mlmamba")
    tiny_model(seed=4).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(folder):
    return pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    red = PIL.Image.new("RGB", (50, 40), (255, 0, 0))
    gradient = PIL.Image.linear_gradient("L").resize((48, 64)).convert("RGB")
    path = tmp_path_factory.mktemp("images") / "gradient.png"
    gradient.save(path)
    return {"red": red, "gradient": gradient, "gradient_path": str(path)}


def chat(image, question):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def reference_answer(pipe, image, prompt_text):
    """Greedy answer of the loaded model on `[image tokens] + tokens(prompt_text)`, decoded by the tokenizer."""
    tokenizer = pipe.processor.tokenizer
    text_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([[TINY_IMAGE_TOKEN_ID] * 16 + text_ids])
    pixel_values = pipe.processor.image_processor(image)["pixel_values"]
    out = pipe.model.generate(input_ids=input_ids, pixel_values=pixel_values, **GENERATE)
    answer = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
    assert answer  # a non-empty reference, or the comparisons below would prove little
    return answer


def test_pipeline_finds_model_and_processor(pipe):
    assert type(pipe.model).__name__ == "MLMambaForConditionalGeneration"
    assert type(pipe.processor).__name__ == "MLMambaProcessor"
    assert pipe.tokenizer.padding_side == "left"


def test_chat_with_a_pil_image(pipe, images):
    question = "what is in the image ?"
    out = pipe(text=chat(images["red"], question), generate_kwargs=GENERATE, return_full_text=False)
    expected = reference_answer(pipe, images["red"], f"<|user|>\n{question}<|endoftext|>\n<|assistant|>\n")
    assert out[0]["generated_text"] == expected
    full = pipe(text=chat(images["red"], question), generate_kwargs=GENERATE)
    assert full[0]["generated_text"][-1] == {"role": "assistant", "content": expected}


def test_chat_with_an_image_path(pipe, images):
    question = "describe this picture ."
    out = pipe(text=chat(images["gradient_path"], question), generate_kwargs=GENERATE, return_full_text=False)
    expected = reference_answer(pipe, images["gradient"], f"<|user|>\n{question}<|endoftext|>\n<|assistant|>\n")
    assert out[0]["generated_text"] == expected


def test_plain_images_and_text(pipe, images):
    prompt = "<|user|>\nhow many birds are there ?<|endoftext|>\n<|assistant|>\n"
    out = pipe(images=images["gradient"], text=prompt, generate_kwargs=GENERATE, return_full_text=False)
    assert out[0]["generated_text"] == reference_answer(pipe, images["gradient"], prompt)


def test_generate_kwargs_pass_through(pipe, images):
    out = pipe(text=chat(images["red"], "yes ?"), generate_kwargs={"max_new_tokens": 3, "min_new_tokens": 3},
               return_tensors=True)
    prompt_len = 16 + len(pipe.processor.tokenizer("<|user|>\nyes ?<|endoftext|>\n<|assistant|>\n")["input_ids"])
    assert len(out[0]["generated_token_ids"]) == prompt_len + 3


def test_batched_inputs_equal_one_by_one(pipe, images):
    chats = [
        chat(images["red"], "what is in the image ?"),
        chat(images["gradient_path"], "a dog ? tell me more about it and then what ?"),
        chat(images["gradient"], "no"),
    ]
    one_by_one = [pipe(text=c, generate_kwargs=GENERATE, return_full_text=False)[0]["generated_text"] for c in chats]
    assert len(set(one_by_one)) == 3
    batched = pipe(text=chats, generate_kwargs=GENERATE, return_full_text=False, batch_size=3)
    assert [r[0]["generated_text"] for r in batched] == one_by_one
    unbatched_list = pipe(text=chats, generate_kwargs=GENERATE, return_full_text=False)
    assert [r[0]["generated_text"] for r in unbatched_list] == one_by_one

    prompts = ["what is it", "a dog ? tell me more about it"]
    alone = [pipe(images=im, text=p, generate_kwargs=GENERATE, return_full_text=False)[0]["generated_text"]
             for im, p in zip([images["red"], images["gradient"]], prompts)]
    assert len(set(alone)) == 2
    together = pipe(images=[images["red"], images["gradient"]], text=prompts, generate_kwargs=GENERATE,
                    return_full_text=False)
    assert [r["generated_text"] for r in together] == alone


def test_pipeline_reports_a_missing_image_file(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        pipe(text=chat(str(tmp_path / "missing.png"), "what ?"), generate_kwargs=GENERATE)
