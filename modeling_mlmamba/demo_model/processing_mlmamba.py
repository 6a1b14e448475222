"""ML-Mamba processor: image processor + tokenizer + the Zephyr chat template of the original model.

Prompt (Zephyr, as the original Cobra / ML-Mamba `ZephyrChatPromptBuilder`; no BOS, no system prompt):

    <image>…<image><|user|>\n{q1}<|endoftext|>\n<|assistant|>\n{a1}<|endoftext|>\n<|user|>\n{q2}<|endoftext|>\n<|assistant|>\n

- Each `<image>` (an added special token) expands to `num_image_tokens` image tokens (729 for the release). The model
  scatters the image features there. A conversation's images go before the whole prompt, where the original model
  saw them (it prepended the image embeddings and stripped `<image>` from the text).
- Message texts are stripped and lose any literal `<image>`, as in the original; an empty answer becomes " ".
- Training (`build_training_example`): labels are -100 on user turns (with the `<|assistant|>\n` header that follows
  them), image positions and padding; answers and their `<|endoftext|>` are supervised. Text is truncated at 2048
  tokens, the image tokens come on top. Each turn is tokenized on its own, as the original does.
- Generation pads on the left (the processor's default), training on the right (`collate_training_examples`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import AddedToken
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from .image_processing_mlmamba import MLMambaImageProcessor, flatten_images, is_single_image


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
MAX_TEXT_TOKENS = 2048  # the original truncates the text here; image tokens come on top
USER, ASSISTANT, END = "<|user|>\n", "<|assistant|>\n", "<|endoftext|>"

# Jinja: every literal is emitted through an expression, so that trim_blocks / lstrip_blocks cannot eat a newline.
MLMAMBA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(images=0, turns=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is not string -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<image>' * ns.images -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('\\n') -%}{%- endif -%}"
    "{%- set text = text | replace('<image>', '') | trim -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- ('\\n' if ns.turns > 0 else '') + '<|user|>\\n' + text + '<|endoftext|>\\n' -}}"
    "{%- set ns.turns = ns.turns + 1 -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- generation -%}{{- (text if text else ' ') + '<|endoftext|>' -}}{%- endgeneration -%}"
    "{%- set ns.turns = ns.turns + 1 -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

_IMAGE_KEYS = ("image", "url", "path", "base64")
_TOKENIZER_KWARGS = {
    "padding", "truncation", "max_length", "pad_to_multiple_of", "return_attention_mask", "return_token_type_ids",
    "add_special_tokens", "padding_side", "return_offsets_mapping", "return_length", "verbose",
}
_IMAGE_KWARGS = {"image_resize_strategy"}
# Accepted for compatibility with transformers' callers (pipelines, apply_chat_template), without effect here.
_IGNORED_KWARGS = {
    "return_mm_token_type_ids", "timeout", "sanitize_control_tokens", "do_sample_frames", "return_metadata",
    "return_text_replacement_offsets",
}


def message_text(message: dict) -> str:
    """A message's text as the template renders it: text parts joined by newlines, `<image>` removed, stripped."""
    content = message.get("content")
    if content is None:
        content = ""
    if isinstance(content, str):
        text = content
    elif isinstance(content, (list, tuple)):
        parts = []
        for item in content:
            if not isinstance(item, dict) or "type" not in item:
                raise ValueError(f"Message content items must be dicts with a 'type' ('text' or 'image'), got {item!r}")
            if item["type"] == "text":
                parts.append(str(item.get("text", "")))
        text = "\n".join(parts)
    else:
        raise ValueError(f"Message content must be a string or a list of items, got {type(content).__name__}")
    return text.replace("<image>", "").strip()


def message_images(message: dict) -> list[tuple[bool, Any]]:
    """(has_payload, payload) for each image item of a message, in order."""
    content = message.get("content")
    if not isinstance(content, (list, tuple)):
        return []
    found = []
    for item in content:
        if isinstance(item, dict) and item.get("type") in ("image", "image_url"):
            payload = next((item[k] for k in _IMAGE_KEYS if item.get(k) is not None), None)
            if payload is None and isinstance(item.get("image_url"), dict):
                payload = item["image_url"].get("url")
            found.append((payload is not None, payload))
    return found


def _check_conversation(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError(f"Expected a conversation (a non-empty list of messages), got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"Message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ("user", "assistant", "system"):
            raise ValueError(f"Message {i} has role {m['role']!r}; expected 'user', 'assistant' or 'system'")
    turns = [m for m in messages if m["role"] != "system"]  # the original's system prompt is empty
    if not turns:
        raise ValueError("The conversation has no user or assistant message (only system messages)")
    return turns


class MLMambaProcessor(ProcessorMixin):
    r"""
    Constructs an ML-Mamba processor: an [`MLMambaImageProcessor`], a tokenizer (GPT-NeoX BPE for the release) and
    the Zephyr chat template.

    Args:
        image_processor ([`MLMambaImageProcessor`]): the image processor.
        tokenizer ([`PreTrainedTokenizerBase`]): the tokenizer; `<image>` is added to it as a special token if needed,
            and its padding side set to "left" (generation; training examples are padded on the right).
        num_image_tokens (`int`, *optional*, defaults to 729): image tokens per image (the towers' patch grid²).
        image_token (`str`, *optional*, defaults to `"<image>"`): the placeholder.
        chat_template (`str`, *optional*): defaults to the original model's Zephyr prompt (`MLMAMBA_CHAT_TEMPLATE`).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 729,
        image_token: str = "<image>",
        chat_template: str | None = None,
        **kwargs,
    ):
        if image_processor is None or tokenizer is None:
            raise ValueError("MLMambaProcessor needs both an image_processor and a tokenizer")
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        # The placeholder must be one added special token, or the BPE merges runs of it.
        if image_token not in tokenizer.all_special_tokens:
            tokenizer.add_special_tokens(
                {"extra_special_tokens": [AddedToken(image_token, special=True, normalized=False)]},
                replace_extra_special_tokens=False,
            )
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        ids = tokenizer.encode(image_token * 3, add_special_tokens=False)
        if ids != [self.image_token_id] * 3:
            raise ValueError(f"{image_token!r} must tokenize to one special token id; '{image_token * 3}' gave {ids}")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # generation; pipelines batch with the tokenizer's side
        if chat_template is None:
            chat_template = MLMAMBA_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_model_config(cls, config, tokenizer, **kwargs) -> "MLMambaProcessor":
        """The processor for an `MLMambaConfig` and a tokenizer: towers' size and normalisations, image token count.

        Checks that the tokenizer's `<image>` id is the config's `image_token_id` (adding the token if needed)."""
        image_processor = MLMambaImageProcessor.from_model_config(config)
        processor = cls(image_processor, tokenizer, num_image_tokens=config.num_image_tokens, **kwargs)
        if processor.image_token_id != config.image_token_id:
            raise ValueError(
                f"The tokenizer's {processor.image_token!r} has id {processor.image_token_id} but the model config's "
                f"image_token_id is {config.image_token_id}"
            )
        return processor

    # ------------------------------------------------------------------------------------------------------------
    # Generation inputs
    # ------------------------------------------------------------------------------------------------------------
    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        """
        Prepares generation (or scoring) inputs.

        text: a string or a list of strings. Each `<image>` in a text becomes `num_image_tokens` image tokens, in the
            order of `images`. Images given with texts that have no `<image>` at all are put first (before the text),
            where the original model saw them: with one text all images go to it, with a batch one image per text.
        images: PIL images, numpy arrays, torch tensors or file paths; a flat list, or one list per text.
        padding_side: "left" by default (generation). Other tokenizer options (padding, truncation, max_length,
            return_tensors, ...) pass through.

        Returns a `BatchFeature` with `input_ids`, `attention_mask` and, with images, `pixel_values`
        (`[num_images, 3 × towers, H, W]`, a torch tensor unless `return_tensors` asks for another type).
        """
        if videos is not None or audio is not None:
            raise ValueError("MLMambaProcessor handles images and text only (got videos or audio)")
        for nested in ("text_kwargs", "images_kwargs", "common_kwargs"):
            kwargs.update(kwargs.pop(nested, None) or {})
        return_tensors = kwargs.pop("return_tensors", None)
        tokenizer_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _TOKENIZER_KWARGS}
        image_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _IMAGE_KWARGS}
        for key in kwargs:
            if key not in _IGNORED_KWARGS:
                logger.warning_once(f"MLMambaProcessor: ignoring unknown keyword argument {key!r}")
        tokenizer_kwargs.setdefault("padding_side", "left")

        if text is None:
            if images is None:
                raise ValueError("MLMambaProcessor needs text, images or both; got neither")
            return self.image_processor(images, return_tensors=return_tensors or "pt", **image_kwargs)
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"text must be a string or a non-empty list of strings, got {text!r}")

        per_sample = self._assign_images(texts, images)
        expanded, replacement_offsets = [], []
        for sample, sample_images in zip(texts, per_sample):
            n_placeholders = sample.count(self.image_token)
            if n_placeholders == 0 and sample_images:
                sample = self.image_token * len(sample_images) + sample
            new_text, offsets = self._expand_placeholders(sample)
            expanded.append(new_text)
            replacement_offsets.append(offsets)

        text_inputs = self.tokenizer(expanded, **tokenizer_kwargs)
        for i, ids in enumerate(text_inputs["input_ids"]):
            found = sum(1 for t in ids if t == self.image_token_id)
            expected = expanded[i].count(self.image_token)
            if found != expected:
                raise ValueError(
                    f"Text {i} should hold {expected} image tokens but holds {found} after tokenization: truncation "
                    f"(max_length={tokenizer_kwargs.get('max_length')}) cut into the image tokens"
                )
        data = dict(text_inputs)
        if tokenizer_kwargs.get("return_offsets_mapping"):
            data["text_replacement_offsets"] = replacement_offsets
        flat_images = [image for sample_images in per_sample for image in sample_images]
        if flat_images:
            pixel_values = self.image_processor(flat_images, return_tensors=None, **image_kwargs)["pixel_values"]
            data["pixel_values"] = torch.from_numpy(pixel_values)
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"])

    def _assign_images(self, texts: list[str], images: Any) -> list[list]:
        """Which images belong to which text, checking the placeholder counts."""
        counts = [t.count(self.image_token) for t in texts]
        if images is None:
            if sum(counts):
                raise ValueError(
                    f"The text has {sum(counts)} {self.image_token} placeholder(s) (per text: {counts}) "
                    "but no images were given"
                )
            return [[] for _ in texts]
        nested = (
            isinstance(images, (list, tuple))
            and len(images) > 0
            and all(isinstance(x, (list, tuple)) for x in images)
        )
        if nested:
            if len(images) != len(texts):
                raise ValueError(f"Got {len(images)} lists of images for {len(texts)} texts; expected one per text")
            per_sample = [flatten_images(x) for x in images]
            for i, (count, sample_images) in enumerate(zip(counts, per_sample)):
                if count and count != len(sample_images):
                    raise ValueError(
                        f"Text {i} has {count} {self.image_token} placeholder(s) but {len(sample_images)} image(s) "
                        "were given for it"
                    )
            return per_sample
        flat = flatten_images(images)
        if sum(counts):
            if sum(counts) != len(flat):
                raise ValueError(
                    f"The text has {sum(counts)} {self.image_token} placeholder(s) (per text: {counts}) but "
                    f"{len(flat)} image(s) were given"
                )
            out, start = [], 0
            for count in counts:
                out.append(flat[start : start + count])
                start += count
            return out
        # No placeholder anywhere: images go first, as the original model saw them.
        if len(texts) == 1:
            return [flat]
        if len(flat) == len(texts):
            return [[image] for image in flat]
        raise ValueError(
            f"{len(flat)} image(s) for {len(texts)} texts without {self.image_token} placeholders: give one image per "
            f"text, one list of images per text, or put {self.image_token} in the texts"
        )

    def _expand_placeholders(self, text: str) -> tuple[str, list[dict]]:
        replacement = self.image_token * self.num_image_tokens
        pieces, offsets, last, gained = [], [], 0, 0
        for m in re.finditer(re.escape(self.image_token), text):
            start, end = m.span()
            pieces.append(text[last:start])
            new_start = start + gained
            offsets.append(
                {"type": "image", "span": (start, end), "new_span": (new_start, new_start + len(replacement)),
                 "text": self.image_token, "replacement": replacement}
            )
            pieces.append(replacement)
            gained += len(replacement) - (end - start)
            last = end
        pieces.append(text[last:])
        return "".join(pieces), offsets

    # ------------------------------------------------------------------------------------------------------------
    # Training examples
    # ------------------------------------------------------------------------------------------------------------
    def build_training_example(self, messages: list[dict], images: Any = None, max_length: int | None = None) -> dict:
        """
        One training example from a conversation, exactly as the original builds it.

        messages: HF chat format, `[{"role": "user" | "assistant" | "system", "content": str | [{"type": "image"[,
            "image": ...]}, {"type": "text", "text": ...}]}, ...]`. System messages are ignored (the original's
            system prompt is empty). After them, roles must alternate user / assistant, starting with a user turn and
            ending with an assistant answer.
        images: the conversation's images, when they are not inline in the content (`{"type": "image", "image": x}`).
            With `images=`, the conversation may mark where they are with `{"type": "image"}` items (their number must
            match) or not at all (LLaVA-style `"<image>\\n…"` text works too). All images go before the prompt.
        max_length: text tokens kept (default 2048, as the original); the image tokens come on top.

        Returns a dict: `input_ids`, `attention_mask`, `labels` (1-D LongTensors; labels are -100 on user turns,
        image positions and padding) and `pixel_values` (`[num_images, 3 × towers, H, W]`, or None without images).
        """
        turns = _check_conversation(messages)
        for i, m in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if m["role"] != expected:
                raise ValueError(
                    f"Training conversations alternate user / assistant turns starting with user: turn {i} "
                    f"(system messages skipped) should be {expected!r} but is {m['role']!r}"
                )
        if turns[-1]["role"] != "assistant":
            raise ValueError("A training conversation must end with an assistant answer; it ends with a user turn")

        image_list = self._conversation_images(messages, images)

        input_ids, labels = [], []
        for i, m in enumerate(turns):
            text = message_text(m)
            if m["role"] == "user":
                segment = ("\n" if i > 0 else "") + USER + text + END + "\n" + ASSISTANT
            else:
                segment = (text if text else " ") + END
            ids = self.tokenizer(segment, add_special_tokens=False)["input_ids"]
            input_ids.extend(ids)
            labels.extend(ids if m["role"] == "assistant" else [IGNORE_INDEX] * len(ids))
        max_length = MAX_TEXT_TOKENS if max_length is None else int(max_length)
        input_ids, labels = input_ids[:max_length], labels[:max_length]

        pixel_values = None
        if image_list:
            n_image_tokens = self.num_image_tokens * len(image_list)
            input_ids = [self.image_token_id] * n_image_tokens + input_ids
            labels = [IGNORE_INDEX] * n_image_tokens + labels
            pixel_values = torch.from_numpy(self.image_processor(image_list, return_tensors=None)["pixel_values"])
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
        }

    def _conversation_images(self, messages: list[dict], images: Any) -> list:
        items = [entry for m in messages for entry in message_images(m)]
        inline = [payload for has, payload in items if has]
        given = flatten_images(images)
        if inline and given:
            raise ValueError(
                f"The conversation holds {len(inline)} inline image(s) and images= gives {len(given)} more: "
                "give the images either inline or through images=, not both"
            )
        if given:
            if items and len(items) != len(given):
                raise ValueError(
                    f"The conversation has {len(items)} image entries but {len(given)} image(s) were given"
                )
            return given
        if len(inline) != len(items):
            raise ValueError(
                f"The conversation has {len(items)} image entries but only {len(inline)} carry an image "
                "('image', 'url' or 'path' key) and no images= were given"
            )
        return inline

    def collate_training_examples(self, examples: list[dict]) -> dict:
        """
        Batches `build_training_example` outputs for `model(**batch)`: right padding (pad id, labels -100,
        attention 0); `pixel_values` of the examples that have images concatenated in order (None if none has).
        """
        if not examples:
            raise ValueError("collate_training_examples got no examples")
        pad_id = self.tokenizer.pad_token_id
        length = max(len(e["input_ids"]) for e in examples)
        batch = {
            "input_ids": torch.full((len(examples), length), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
            "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
        }
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(e["input_ids"])
            batch["attention_mask"][i, :n] = torch.as_tensor(e["attention_mask"])
            batch["labels"][i, :n] = torch.as_tensor(e["labels"])
        pixels = [e["pixel_values"] for e in examples if e.get("pixel_values") is not None]
        batch["pixel_values"] = torch.cat(pixels, dim=0) if pixels else None
        return batch

    @staticmethod
    def messages_from_llava(conversations: list[dict]) -> list[dict]:
        """LLaVA JSON turns (`[{"from": "human" | "gpt", "value": ...}, ...]`) → HF chat messages. A `<image>`
        in the text becomes an `{"type": "image"}` item (pass the image itself with `images=`)."""
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        messages = []
        for turn in conversations:
            if turn.get("from") not in roles:
                raise ValueError(f"LLaVA turns come 'from' 'human' or 'gpt', got {turn!r}")
            value = turn.get("value", "")
            content = [{"type": "image"}] * value.count("<image>") + [{"type": "text", "text": value}]
            messages.append({"role": roles[turn["from"]], "content": content})
        return messages

    # ------------------------------------------------------------------------------------------------------------
    # Chat template
    # ------------------------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, *args, **kwargs):
        """Renders the Zephyr prompt (see the module docstring); with `tokenize=True` the images in the messages
        (`{"type": "image", "image": PIL / path / array}`) are loaded and processed too. Accepts one conversation or
        a list of them."""
        batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 and isinstance(
            conversation[0], (list, tuple)
        )
        for conv in conversation if batched else [conversation]:
            _check_conversation(conv)
            for m in conv:
                message_text(m)  # content format check
                for has_payload, payload in message_images(m):
                    if has_payload and not (is_single_image(payload) or isinstance(payload, str)):
                        raise ValueError(
                            f"An image entry holds a {type(payload).__name__}, not an image (PIL, array, tensor or path)"
                        )
        return super().apply_chat_template(conversation, *args, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Decoding
    # ------------------------------------------------------------------------------------------------------------
    def _drop_image_runs(self, ids) -> list[int]:
        """Token ids with each run of image tokens shortened to one (or removed when special tokens are skipped)."""
        out = []
        for t in ids:
            if t == self.image_token_id and out and out[-1] == self.image_token_id:
                continue
            out.append(t)
        return out

    def _as_lists(self, sequences):
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        elif hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return sequences

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        """Decodes a batch; image tokens never come out as 729 `<image>` strings (one per image at most)."""
        sequences = self._as_lists(sequences)
        return [self.decode(seq, skip_special_tokens=skip_special_tokens, **kwargs) for seq in sequences]

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        token_ids = self._as_lists(token_ids)
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self.tokenizer.decode(
            self._drop_image_runs(token_ids), skip_special_tokens=skip_special_tokens, **kwargs
        )

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decodes `generate()` outputs: a list of strings for a batch `[batch, seq]`, a string for one sequence.
        Special tokens (padding, `<|endoftext|>`, image tokens) are dropped by default; decode
        `outputs[:, input_ids.shape[1]:]` to get the answers alone."""
        sequences = self._as_lists(generated_outputs)
        if sequences and isinstance(sequences[0], list):
            return self.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)
        return self.decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


MLMambaProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["MLMambaProcessor", "MLMAMBA_CHAT_TEMPLATE", "IGNORE_INDEX"]
