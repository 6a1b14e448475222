"""Answer questions about images with an ML-Mamba model and score the answers.

    python recipes/evaluate.py --model runs/my-run/merged --data eval.jsonl --image_folder images/ \
        --output predictions.jsonl

--data is a JSONL file, one {"image": "rel/path.jpg", "question": "...", "answer": "..."} a line ("answer" may be a
list of accepted answers; "image" may be absent for a text-only question). Questions go through the processor's
chat template (one user turn, the image first), in batches, left-padded, decoded greedily.

Two scores, both after normalising prediction and answer the same way (lower case, runs of whitespace → one space,
trailing . , ! ? ; : and whitespace removed):
  exact match       the normalised prediction equals a normalised answer;
  contains answer   a normalised answer occurs in the normalised prediction (for models that answer in sentences).
Predictions go to --output as JSONL: the input record plus "prediction", "exact_match", "contains_answer".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip().rstrip(".,!?;: ").strip()


def score(prediction: str, answers) -> tuple[bool, bool]:
    """(exact match, contains answer) of a prediction against one answer or a list of accepted ones."""
    answers = [answers] if isinstance(answers, str) else answers
    prediction = normalize(prediction)
    normalized = [normalize(a) for a in answers]
    return any(prediction == a for a in normalized), any(a in prediction for a in normalized)


def read_questions(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{line_number}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get("question"), str) or "answer" not in record:
                raise SystemExit(f"{path}:{line_number}: expected an object with 'question' and 'answer'")
            records.append(record)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder or Hub id (loaded with trust_remote_code)")
    p.add_argument("--data", required=True, help="JSONL of {image, question, answer}")
    p.add_argument("--image_folder", default=".", help="image paths in --data are relative to this folder")
    p.add_argument("--output", default="predictions.jsonl")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    args = p.parse_args(argv)

    records = read_questions(args.data)[: args.limit]
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(
        args.model, trust_remote_code=True, dtype=getattr(torch, args.dtype)
    ).to(args.device).eval()

    predictions = []
    for start in tqdm(range(0, len(records), args.batch_size), desc="evaluating"):
        batch = records[start: start + args.batch_size]
        prompts, images = [], []
        for record in batch:
            content = [{"type": "text", "text": record["question"]}]
            if record.get("image"):
                content.insert(0, {"type": "image"})
                images.append(Image.open(os.path.join(args.image_folder, record["image"])).convert("RGB"))
            prompts.append(processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            ))
        # left padding (the processor's default for generation): every prompt ends where its answer starts
        inputs = processor(images=images or None, text=prompts, return_tensors="pt", padding=True).to(args.device)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        predictions += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]

    exact = contains = 0
    with open(args.output, "w", encoding="utf-8") as f:
        for record, prediction in zip(records, predictions):
            is_exact, has_answer = score(prediction, record["answer"])
            exact += is_exact
            contains += has_answer
            f.write(json.dumps({**record, "prediction": prediction, "exact_match": is_exact,
                                "contains_answer": has_answer}) + "\n")
    n = max(len(records), 1)
    print(f"{len(records)} questions: exact match {100 * exact / n:.2f}%, contains answer {100 * contains / n:.2f}%")
    print(f"predictions: {args.output}")


if __name__ == "__main__":
    sys.exit(main())
