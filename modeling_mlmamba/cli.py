"""The `mlmamba` command (also `python -m modeling_mlmamba`): ask an ML-Mamba model about an image.

    mlmamba demo                                     the shipped demo model on its example image, a few questions
    mlmamba generate --image PATH --prompt TEXT      one answer, streamed as it is decoded
    mlmamba chat --image PATH                        a multi-turn conversation about one image (stdin, one line a turn)

`--model` takes a model folder or a Hub id (default: the demo model shipped inside this package, a small ML-Mamba
trained on synthetic images of coloured shapes; see demo/README.md). Decoding is greedy, as the original's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The demo model ships inside the package (package data), so that `mlmamba` works with no download.
DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
DEMO_IMAGE = DEMO_MODEL / "examples" / "shapes.png"
DEMO_QUESTIONS = (  # about examples/shapes.png (test split image 12, which the demo model never saw)
    "Describe the image.",
    "How many objects are there?",
    "What color is the circle?",
    "What shape is the yellow object?",
    "Is the purple square above the blue circle?",
    "Is the purple triangle above the purple square?",
    "What shape is above the blue circle?",
)
EXIT_WORDS = {"exit", "quit", "/exit", "/quit"}


def load(model_id: str, device: str | None = None, dtype: str | None = None):
    """(model, processor) for a folder or a Hub id, with this package's classes, on `device` in `dtype`."""
    import torch

    from .modeling_mlmamba import MLMambaForConditionalGeneration
    from .processing_mlmamba import MLMambaProcessor

    # "user/name" may be a Hub id; a path that cannot be one and does not exist is a mistyped folder.
    looks_local = (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1
                   or (os.sep != "/" and os.sep in model_id))
    if looks_local and not os.path.isdir(os.path.expanduser(model_id)):
        raise SystemExit(f"mlmamba: model folder not found: {model_id}")
    model_id = os.path.expanduser(model_id)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        processor = MLMambaProcessor.from_pretrained(model_id)
        model = MLMambaForConditionalGeneration.from_pretrained(model_id, dtype=getattr(torch, dtype))
    except OSError as err:  # not found locally nor on the Hub, or offline
        raise SystemExit(f"mlmamba: cannot load the model {model_id!r}: {err}") from None
    return model.to(device).eval(), processor


def open_image(path: str):
    from .image_processing_mlmamba import load_image_file

    try:
        return load_image_file(path).convert("RGB")
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"mlmamba: {err}") from None


def answer(model, processor, messages: list[dict], image, max_new_tokens: int, stream: bool = True) -> str:
    """Greedy answer to the last user turn of `messages`, printed token by token as it comes when `stream`."""
    import torch
    from transformers import TextStreamer

    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=text, return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def user_turn(text: str, with_image: bool) -> dict:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


# ---- subcommands ---------------------------------------------------------------------------------------------
def cmd_generate(args) -> None:
    image = open_image(args.image)
    model, processor = load(args.model, args.device, args.dtype)
    answer(model, processor, [user_turn(args.prompt, True)], image, args.max_new_tokens)


def cmd_chat(args) -> None:
    image = open_image(args.image)
    model, processor = load(args.model, args.device, args.dtype)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting about {args.image}. One line a turn; /image PATH starts over with another image, /reset "
              "forgets the conversation, exit or Ctrl-D ends.")
    messages: list[dict] = []
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            if interactive:
                print()
            return
        line = line.strip()
        if not line:
            continue
        if line.lower() in EXIT_WORDS:
            return
        if line == "/reset":
            messages = []
            print("(conversation reset)")
            continue
        if line.startswith("/image "):
            args.image = line[len("/image ") :].strip()
            image = open_image(args.image)
            messages = []
            print(f"(new conversation about {args.image})")
            continue
        messages.append(user_turn(line, with_image=not messages))
        print("mlmamba> " if interactive else "", end="", flush=True)
        reply = answer(model, processor, messages, image, args.max_new_tokens)
        messages.append({"role": "assistant", "content": reply})


def cmd_demo(args) -> None:
    if args.model == str(DEMO_MODEL) and not (DEMO_MODEL / "config.json").is_file():
        raise SystemExit(f"mlmamba: the demo model is missing from {DEMO_MODEL} (demo/train.sh rebuilds it)")
    image_path = args.image or str(DEMO_IMAGE)
    image = open_image(image_path)
    model, processor = load(args.model, args.device, args.dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ML-Mamba: {args.model}")
    print(f"  {n_params / 1e6:.1f}M parameters: {len(model.config.vision_config)} vision tower(s) → Mamba-2 Scan "
          f"Connector ({model.config.scan_type.upper()}) → {model.config.text_config.num_hidden_layers}-layer "
          f"Mamba-2 language model, on {model.device} in {str(model.dtype).replace('torch.', '')}")
    print(f"  image: {image_path}\n")
    for question in args.questions or DEMO_QUESTIONS:
        print(f"Q: {question}\nA: ", end="", flush=True)
        answer(model, processor, [user_turn(question, True)], image, args.max_new_tokens)
    print(f"\nAsk your own: mlmamba generate --image {image_path} --prompt \"What color is the circle?\"")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlmamba", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=str(DEMO_MODEL),
                        help="model folder or Hub id (default: the shipped demo model)")
    common.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (default 64)")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    common.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: bfloat16 on GPU, float32 on CPU")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,generate,chat}")

    p = sub.add_parser("generate", parents=[common], help="answer one prompt about an image, streamed",
                       description="Answer one prompt about an image; the answer is printed as it is decoded.")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...) or http(s) URL")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", parents=[common], help="multi-turn conversation about an image",
                       description="A multi-turn conversation about one image: one line of stdin a turn; "
                                   "'exit' or end of input stops, '/reset' forgets, '/image PATH' switches image.")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...) or http(s) URL")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", parents=[common], help="the shipped demo model answers questions about its image",
                       description="Runs the shipped demo model (or --model) end to end on the included example "
                                   "image (or --image) with a few fixed questions (or --question, repeatable).")
    p.add_argument("--image", default=None, help=f"default: {DEMO_IMAGE}")
    p.add_argument("--question", dest="questions", action="append", default=None, help="ask this instead")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Quiet by default: the kernel fall-back notices (no mamba_ssm on CPU) are for developers, not for a demo.
    if not os.environ.get("MLMAMBA_VERBOSE"):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
