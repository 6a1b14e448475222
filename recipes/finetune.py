"""Fine-tune ML-Mamba on your own data with Accelerate (+ PEFT LoRA), from one GPU to many.

    accelerate launch recipes/finetune.py --model path/or/hub-id --data llava.json --image_folder images/ \
        --output_dir runs/my-run
    accelerate launch --config_file recipes/accelerate_ddp.yaml recipes/finetune.py ...    # several GPUs
    python recipes/finetune.py ...                                                         # one process works too

Data, either
  --data FILE.json|FILE.jsonl  LLaVA conversations (SPEC §5): {"image": "rel/path.jpg" (or a list, or absent for
                               text-only), "conversations": [{"from": "human", "value": "<image>\\n..."},
                               {"from": "gpt", "value": "..."}, ...]}; image paths are relative to --image_folder.
  --dataset ID_OR_PATH         any `datasets` dataset (Hub id, local data files, or a `save_to_disk` folder) with a
                               chat `messages` column and an `images` (list) or `image` column; text-only rows allowed.
Every sample is checked before training: malformed JSON (file and line), missing images (file name), conversations
without an answer. `--on_bad_sample error` stops at the first one, `skip` drops them and says how many.

Modes (the vision towers are frozen in all three, as in every original stage):
  lora   LoRA on the LM mixers' `in_proj` and on the connector's linear layers (pre-connector, MSC `in_proj` and
         SwiGLU, projector); never `out_proj` / `conv1d` (the fused mamba_ssm kernel bypasses LoRA there, SPEC §7).
         The connector's scan parameters (conv, A, D, dt bias) and norms stay as they are. Defaults follow
         LLaVA-1.5's LoRA recipe (r 128, alpha 256, dropout 0.05, lr 2e-4), ML-Mamba's ancestor.
  full   the original fine-tuning stage: LM, pre-connector, MSC and projector train, lr 2e-5.
  align  the original first stage: only the connector trains, lr 1e-3, no weight decay.

Outputs in --output_dir: checkpoints/step-N/ (Accelerate state; --resume continues from the latest with the same data
order and step count), log.jsonl (loss, learning rate), adapter/ (lora mode: the PEFT adapter), and merged/: a
self-contained model folder (safetensors + config + code + processor) that loads with
`AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, get_cosine_schedule_with_warmup

# -----------------------------------------------------------------------------------------------------------------
# Defaults: the original recipe (SPEC §5) unless said otherwise. Every one is a command-line flag.
# -----------------------------------------------------------------------------------------------------------------
LEARNING_RATE = {"lora": 2e-4, "full": 2e-5, "align": 1e-3}  # full / align: the paper's; lora: LLaVA-1.5's LoRA
GLOBAL_BATCH_SIZE = {"lora": 128, "full": 128, "align": 256}  # sequences per optimizer step, over all processes
WEIGHT_DECAY = {"lora": 0.1, "full": 0.1, "align": 0.0}  # never on biases and 1-D parameters
WARMUP_RATIO = 0.03  # then cosine decay to 0
MAX_GRAD_NORM = 1.0
MAX_LENGTH = 2048  # text tokens per sample (the image tokens come on top)
LORA_R, LORA_ALPHA, LORA_DROPOUT = 128, 256, 0.05

# LoRA targets, as a regular expression PEFT matches against whole module names (SPEC §7: in_proj and the connector's
# linear layers are safe; out_proj and conv1d are not).
LORA_TARGET_MODULES = (
    r".*(language_model\.layers\.\d+\.mixer\.in_proj"
    r"|connector\.pre_connector\.0"
    r"|connector\.msc\.layers\.\d+\.mixer\.in_proj"
    r"|connector\.msc\.layers\.\d+\.mlp\.w[123]"
    r"|connector\.projector\.[024])"  # Linear, GELU, Linear, GELU, Linear
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="base model folder or Hub id (loaded with trust_remote_code)")
    g.add_argument("--mode", choices=("lora", "full", "align"), default="lora")
    g.add_argument("--lora_r", type=int, default=LORA_R)
    g.add_argument("--lora_alpha", type=int, default=LORA_ALPHA)
    g.add_argument("--lora_dropout", type=float, default=LORA_DROPOUT)

    g = p.add_argument_group("data")
    g.add_argument("--data", help="LLaVA-format .json or .jsonl file")
    g.add_argument("--image_folder", default=".", help="image paths in --data (and path-valued image columns) are "
                   "relative to this folder")
    g.add_argument("--dataset", help="`datasets` dataset: Hub id, local data file(s) or save_to_disk folder")
    g.add_argument("--dataset_config", default=None, help="the dataset's configuration name, if it has several")
    g.add_argument("--train_split", default="train")
    g.add_argument("--validation_data", default=None,
                   help="with --data: a second LLaVA file; with --dataset: a split name (e.g. 'validation')")
    g.add_argument("--validation_fraction", type=float, default=0.0,
                   help="hold out this fraction of the training samples (seeded) for validation instead")
    g.add_argument("--max_length", type=int, default=MAX_LENGTH)
    g.add_argument("--on_bad_sample", choices=("error", "skip"), default="error",
                   help="a malformed record or missing image: stop with its location, or skip it and count it")
    g.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes per training process")

    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=None, help="default: 2e-4 lora, 2e-5 full, 1e-3 align")
    g.add_argument("--weight_decay", type=float, default=None, help="default: 0.1 (lora, full), 0 (align)")
    g.add_argument("--warmup_ratio", type=float, default=WARMUP_RATIO)
    g.add_argument("--max_grad_norm", type=float, default=MAX_GRAD_NORM)
    g.add_argument("--global_batch_size", type=int, default=None, help="default: 128 (lora, full), 256 (align)")
    g.add_argument("--per_device_batch_size", type=int, default=8,
                   help="micro-batch per process; gradient accumulation makes up the global batch")
    g.add_argument("--num_epochs", type=int, default=1)
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps; overrides --num_epochs")
    g.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default=None,
                   help="default: bf16 on GPU, no on CPU (also settable in the accelerate config)")
    g.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false")
    g.add_argument("--seed", type=int, default=42, help="model init of LoRA weights, data order, dropout")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--save_every", type=int, default=500, help="checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--save_total_limit", type=int, default=2, help="keep the latest N checkpoints")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint in --output_dir (or from the checkpoint folder given)")
    g.add_argument("--eval_every", type=int, default=0, help="validation loss every N steps (0: only at the end)")
    g.add_argument("--log_every", type=int, default=1)
    g.add_argument("--report_to", default=None, help="Accelerate trackers: tensorboard, wandb, ... (comma-separated)")
    g.add_argument("--no_merge", dest="merge", action="store_false", help="lora: skip writing merged/")
    g.add_argument("--stop_after_step", type=int, default=None, help=argparse.SUPPRESS)  # tests: a run killed there

    args = p.parse_args(argv)
    if (args.data is None) == (args.dataset is None):
        p.error("give exactly one of --data (LLaVA JSON/JSONL) or --dataset (a `datasets` dataset)")
    args.learning_rate = args.learning_rate if args.learning_rate is not None else LEARNING_RATE[args.mode]
    args.weight_decay = args.weight_decay if args.weight_decay is not None else WEIGHT_DECAY[args.mode]
    args.global_batch_size = args.global_batch_size or GLOBAL_BATCH_SIZE[args.mode]
    return args


# -----------------------------------------------------------------------------------------------------------------
# Data: every source becomes a list of (messages, images) samples, checked before training starts.
# -----------------------------------------------------------------------------------------------------------------
class BadSample(ValueError):
    """A record that cannot be trained on; the message starts with where it is (file:line, file[index], split[row])."""


class BadSamples:
    """Raises at the first bad sample (--on_bad_sample error) or counts and reports them (skip)."""

    def __init__(self, policy: str, log=print):
        self.policy, self.log, self.skipped = policy, log, []

    def __call__(self, error: BadSample) -> None:
        if self.policy == "error":
            raise error
        self.skipped.append(str(error))
        if len(self.skipped) <= 10:
            self.log(f"skipping bad sample: {error}")

    def report(self, what: str, kept: int) -> None:
        if self.skipped:
            self.log(f"{what}: skipped {len(self.skipped)} bad sample(s), kept {kept}")


def read_llava_file(path: str):
    """Yields (location, record) for each record of a LLaVA .json (one array) or .jsonl (one object a line) file.

    A line of JSONL that does not parse is yielded as a BadSample; a .json file that does not parse is unreadable as a
    whole, so that always raises.
    """
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{line_number}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{line_number}", BadSample(f"{path}:{line_number}: malformed JSON: {e.msg} "
                                                             f"(column {e.colno})")
    else:
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise BadSample(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno}); a .json file must "
                                "parse as a whole (use .jsonl to be able to skip bad lines)") from None
        if not isinstance(records, list):
            raise BadSample(f"{path}: expected a JSON array of records, got {type(records).__name__}")
        for index, record in enumerate(records):
            yield f"{path}[{index}]", record


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def user_content(text: str) -> list[dict]:
    """LLaVA text with `<image>` tags → chat content parts, the images where their tags were."""
    content = []
    for i, piece in enumerate(text.split("<image>")):
        if i > 0:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return content


def check_messages(where: str, messages: list[dict], num_images: int) -> list[dict]:
    """Drops system turns (the original's system prompt is empty and ignored), checks roles, the answer and the image
    count; with images but no image part (allowed in LLaVA data), the images go before the first user text."""
    messages = [m for m in messages if m["role"] != "system"]
    roles = [m["role"] for m in messages]
    if roles != ["user", "assistant"] * (len(roles) // 2) or not roles:
        raise BadSample(f"{where}: turns must alternate user, assistant, ..., ending with an answer; got {roles}")
    parts = sum(isinstance(m["content"], list) and sum(c["type"] == "image" for c in m["content"]) for m in messages)
    if parts == 0 and num_images:
        first = messages[0]
        text = first["content"] if isinstance(first["content"], str) else None
        old = [{"type": "text", "text": text}] if text is not None else first["content"]
        messages[0] = {"role": "user", "content": [{"type": "image"}] * num_images + old}
    elif parts != num_images:
        raise BadSample(f"{where}: {parts} image placeholder(s) in the conversation but {num_images} image(s)")
    return messages


def llava_to_sample(where: str, record, image_folder: str) -> tuple[list[dict], list[str]]:
    """One LLaVA record → (messages, image paths), or BadSample."""
    if isinstance(record, BadSample):
        raise record
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise BadSample(f"{where}: expected an object with a 'conversations' list")
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else images
    if not all(isinstance(i, str) for i in images):
        raise BadSample(f"{where}: 'image' must be a path or a list of paths")
    paths = [os.path.join(image_folder, i) for i in images]
    for path in paths:
        if not os.path.isfile(path):
            raise BadSample(f"{where}: image file not found: {path}")
    messages = []
    for turn in record["conversations"]:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise BadSample(f"{where}: each turn needs 'from' (one of {sorted(ROLES)}) and a string 'value'")
        role = ROLES[turn["from"]]
        messages.append({"role": role, "content": user_content(turn["value"]) if role == "user" else turn["value"]})
    return check_messages(where, messages, len(paths)), paths


def load_llava(path: str, image_folder: str, bad: BadSamples) -> list[tuple[list[dict], list[str]]]:
    samples = []
    for where, record in read_llava_file(path):
        try:
            samples.append(llava_to_sample(where, record, image_folder))
        except BadSample as e:
            bad(e)
    return samples


def hf_messages(where: str, messages) -> list[dict]:
    """A `datasets` row's messages → plain chat messages (Arrow fills missing struct fields with None: drop them)."""
    if not isinstance(messages, list):
        raise BadSample(f"{where}: 'messages' must be a list of {{role, content}}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise BadSample(f"{where}: each message needs a role of user, assistant or system")
        content = m.get("content")
        if isinstance(content, list):
            content = [
                {"type": "image"} if c.get("type") == "image" else {"type": "text", "text": c.get("text") or ""}
                for c in content
            ]
        elif not isinstance(content, str):
            raise BadSample(f"{where}: message content must be a string or a list of parts")
        out.append({"role": m["role"], "content": content})
    return out


def load_hf(args, split: str, bad: BadSamples):
    """A `datasets` split → [(messages, HFImages)]: images are decoded when a sample is used, not here."""
    import datasets

    source = args.dataset
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_info.json")) or (
        os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_dict.json"))
    ):
        ds = datasets.load_from_disk(source)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    elif os.path.isfile(source):
        builder = {"jsonl": "json"}.get(source.rsplit(".", 1)[-1], source.rsplit(".", 1)[-1])
        ds = datasets.load_dataset(builder, data_files={split: source}, split=split)
    else:
        ds = datasets.load_dataset(source, args.dataset_config, split=split)
    if "messages" not in ds.column_names:
        raise SystemExit(f"{source} ({split}): no 'messages' column; columns are {ds.column_names}")
    image_column = next((c for c in ("images", "image") if c in ds.column_names), None)

    # Check every row without decoding a single image: image features are read as {bytes, path}.
    raw = ds.select_columns(["messages"] + ([image_column] if image_column else []))
    if image_column:
        feature = raw.features[image_column]
        inner = getattr(feature, "feature", feature)
        if isinstance(inner, datasets.Image):
            undecoded = datasets.Image(decode=False)
            raw = raw.cast_column(image_column, datasets.List(undecoded) if inner is not feature else undecoded)
    samples = []
    for row, record in enumerate(raw):
        where = f"{source} ({split}) row {row}"
        try:
            images = record.get(image_column) if image_column else None
            images = [] if images is None else images if isinstance(images, list) else [images]
            for image in images:
                path = image if isinstance(image, str) else (image or {}).get("path")
                if isinstance(image, dict) and image.get("bytes"):
                    continue
                if not path or not os.path.isfile(os.path.join(args.image_folder, path)):
                    raise BadSample(f"{where}: image file not found: {path}")
            samples.append((check_messages(where, hf_messages(where, record["messages"]), len(images)), row))
        except BadSample as e:
            bad(e)

    return [(messages, HFImages(ds, image_column, row, args.image_folder)) if image_column else (messages, [])
            for messages, row in samples]


class HFImages:
    """The images of one `datasets` row, decoded only when the sample is used."""

    def __init__(self, ds, column: str, row: int, image_folder: str):
        self.ds, self.column, self.row, self.image_folder = ds, column, row, image_folder

    def load(self) -> list:
        images = self.ds[self.row][self.column]
        images = [] if images is None else images if isinstance(images, list) else [images]
        return [open_image(os.path.join(self.image_folder, i)) if isinstance(i, str) else i for i in images]


def open_image(path: str):
    try:
        return Image.open(path)
    except Exception as e:  # a file that exists but is not an image: say which one
        raise ValueError(f"cannot read image {path}: {e}") from e


class ConversationDataset(torch.utils.data.Dataset):
    """(messages, images) samples → the processor's training examples (input_ids, labels, pixel_values).

    images: a list of paths (LLaVA data) or an `HFImages` (a `datasets` row), opened when the sample is read.
    """

    def __init__(self, samples, processor, max_length: int):
        self.samples, self.processor, self.max_length = samples, processor, max_length

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        messages, images = self.samples[index]
        images = images.load() if isinstance(images, HFImages) else [open_image(path) for path in images]
        images = [image.convert("RGB") for image in images]
        return self.processor.build_training_example(messages, images=images or None, max_length=self.max_length)


def build_datasets(args, processor, log):
    """Training and validation ConversationDatasets, bad samples handled as --on_bad_sample says."""

    def load(source: str):
        bad = BadSamples(args.on_bad_sample, log)
        if args.data:
            samples = load_llava(source, args.image_folder, bad)
            bad.report(source, len(samples))
        else:
            samples = load_hf(args, source, bad)
            bad.report(f"{args.dataset} ({source})", len(samples))
        return samples

    train = load(args.data or args.train_split)
    validation = load(args.validation_data) if args.validation_data else []
    if not train:
        raise SystemExit("no training samples left")
    if args.validation_fraction > 0:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_val = max(1, round(args.validation_fraction * len(train)))
        validation = [train[i] for i in order[:n_val]]
        train = [train[i] for i in sorted(order[n_val:])]
    return (ConversationDataset(train, processor, args.max_length),
            ConversationDataset(validation, processor, args.max_length) if validation else None)


class EpochShuffler(torch.utils.data.Sampler):
    """A fresh permutation each epoch, a function of (seed, epoch) only: a resumed run reads the same order."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


# -----------------------------------------------------------------------------------------------------------------
# Model and optimizer
# -----------------------------------------------------------------------------------------------------------------
def build_model(args, log):
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32)
    model.requires_grad_(args.mode == "full")
    model.model.vision_towers.requires_grad_(False)  # frozen towers run without autograd (see get_image_features)
    if args.mode == "align":
        model.model.connector.requires_grad_(True)
    if args.gradient_checkpointing:
        # non-reentrant: the frozen embedding's output needs no requires_grad hack for LoRA.
        # (`activation_checkpointing_enable` is the newer transformers name of `gradient_checkpointing_enable`.)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=LORA_TARGET_MODULES, bias="none")
        model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"mode {args.mode}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)")
    return model


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: never on biases, norms, and the 1-D SSM parameters (A_log, D, dt_bias)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # (LoRA has no 1-D parameters; FSDP's optimizer state wants no empty group)


def materialize_optimizer_state(optimizer) -> None:
    """Creates the optimizer's per-parameter state (Adam's moments) without changing any parameter.

    Adam creates its state at its first step. Under FSDP, Accelerate loads a sharded optimizer checkpoint into the
    entries of the current optimizer's state dict, so into a fresh optimizer it loads no moments at all, and a resumed
    run drifts from its second step on. One step at learning rate 0 with zero gradients creates the entries (what
    torch.distributed.checkpoint does for FSDP2); the checkpoint then overwrites them."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    if optimizer.state:
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def frozen_towers_eval(model):
    """Training mode everywhere except the frozen towers (no dropout / drop-path in features the original froze)."""
    model.train()
    for name, module in model.named_modules():  # found under any wrapper: DDP, FSDP, PEFT
        if name.endswith("vision_towers"):
            module.eval()


# -----------------------------------------------------------------------------------------------------------------
# Checkpoints: Accelerate state (model, optimizer, scheduler, RNG) + where we are in the data, written atomically.
# -----------------------------------------------------------------------------------------------------------------
def checkpoint_steps(folder: str) -> list[int]:
    if not os.path.isdir(folder):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(folder) if (m := re.fullmatch(r"step-(\d+)", d)))


def replace_dir(tmp: str, final: str) -> None:
    """Moves a finished folder into place: a reader sees the old complete folder or the new one, never half of one."""
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator, args, state: dict) -> None:
    folder = os.path.join(args.output_dir, "checkpoints")
    tmp = os.path.join(folder, f".tmp-step-{state['step']}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)  # every process writes its part (its RNG state; its shard under FSDP)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=2)
        replace_dir(tmp, os.path.join(folder, f"step-{state['step']}"))
        for old in checkpoint_steps(folder)[: -args.save_total_limit]:
            shutil.rmtree(os.path.join(folder, f"step-{old}"))
    accelerator.wait_for_everyone()


# What must not change between a run and its resumption: otherwise the data order or the step count would.
SAME_ON_RESUME = ("seed", "global_batch_size", "per_device_batch_size", "num_processes", "mode", "num_samples")


def find_resume_checkpoint(args) -> str:
    if args.resume != "latest":
        return args.resume
    steps = checkpoint_steps(os.path.join(args.output_dir, "checkpoints"))
    if not steps:
        raise SystemExit(f"--resume: no checkpoint in {os.path.join(args.output_dir, 'checkpoints')}")
    return os.path.join(args.output_dir, "checkpoints", f"step-{steps[-1]}")


# -----------------------------------------------------------------------------------------------------------------
# Final outputs
# -----------------------------------------------------------------------------------------------------------------
def save_final(accelerator, args, model, processor, log) -> None:
    state_dict = accelerator.get_state_dict(model)  # a full state dict on the main process, also under FSDP
    # FSDP's wrapped units can leave their wrapper's name inside the keys: the saved folders must not carry it
    state_dict = {re.sub(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module)\.", "", k): v for k, v in state_dict.items()}
    unwrapped = accelerator.unwrap_model(model)
    main = accelerator.is_main_process
    if main and args.mode == "lora":
        # PEFT selects an adapter's entries by the names of the model's LoRA layers, which under FSDP contain the
        # wrappers' names while the gathered keys do not (it would silently drop every wrapped layer). So the
        # adapter is put into a fresh, unwrapped CPU copy of the base model and saved from there, whatever the
        # training sharding was; the merged folder is made from the same copy.
        from peft import get_peft_model

        base = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32)
        fresh = get_peft_model(base, unwrapped.peft_config["default"])
        expected = {k for k in fresh.state_dict() if "lora_" in k}
        weights = {k: v for k, v in state_dict.items() if k in expected}
        if weights.keys() != expected:
            missing = sorted(expected - weights.keys())
            raise RuntimeError(f"{len(missing)} of {len(expected)} LoRA tensors are missing from the gathered state "
                               f"dict, e.g. {missing[:3]}; its keys look like {list(state_dict)[:3]}")
        fresh.load_state_dict(weights, strict=False)
        tmp = os.path.join(args.output_dir, ".tmp-adapter")
        shutil.rmtree(tmp, ignore_errors=True)
        fresh.save_pretrained(tmp)
        replace_dir(tmp, os.path.join(args.output_dir, "adapter"))
        log(f"adapter: {os.path.join(args.output_dir, 'adapter')} ({len(weights)} tensors)")
    if main and (args.mode != "lora" or args.merge):
        tmp = os.path.join(args.output_dir, ".tmp-merged")
        shutil.rmtree(tmp, ignore_errors=True)
        if args.mode == "lora":
            fresh.merge_and_unload().save_pretrained(tmp)
        else:
            unwrapped.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
        replace_dir(tmp, os.path.join(args.output_dir, "merged"))
        log(f"model: {os.path.join(args.output_dir, 'merged')}")
    accelerator.wait_for_everyone()


# -----------------------------------------------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_loss(accelerator, model, loader) -> float:
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for batch in loader:
        total += model(**batch).loss.float()
        count += 1
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    frozen_towers_eval(model)
    return (total / count).item()


def main(argv=None):
    args = parse_args(argv)
    mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    if mixed_precision is None:
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    ddp_options = DistributedDataParallelKwargs()  # find_unused_parameters: set below, once the data is known
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        log_with=args.report_to.split(",") if args.report_to else None,
        project_dir=os.path.join(args.output_dir, "logs"),
        kwargs_handlers=[ddp_options],
    )
    log = accelerator.print  # main process only
    set_seed(args.seed)

    # global batch = per-device batch × processes × accumulation steps
    per_step = args.per_device_batch_size * accelerator.num_processes
    if args.global_batch_size % per_step:
        raise SystemExit(f"--global_batch_size {args.global_batch_size} is not a multiple of per-device batch "
                         f"{args.per_device_batch_size} × {accelerator.num_processes} processes = {per_step}")
    accelerator.gradient_accumulation_steps = args.global_batch_size // per_step

    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    with accelerator.main_process_first():
        train_set, val_set = build_datasets(args, processor, log)
    log(f"{len(train_set)} training samples" + (f", {len(val_set)} validation samples" if val_set else ""))
    # A batch of text-only samples leaves the connector without gradients, which DDP must be told to expect.
    ddp_options.find_unused_parameters = any(not images for _, images in train_set.samples)

    model = build_model(args, log)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.learning_rate, betas=(0.9, 0.999))
    # Each DataLoader gets a generator of its own for its worker seeds: starting an iterator then draws nothing from the
    # global RNG, so a run resumed mid-epoch (a new iterator) sees the same dropout masks as the run it continues.
    loader_options = dict(batch_size=args.per_device_batch_size, collate_fn=processor.collate_training_examples,
                          num_workers=args.num_workers)
    train_loader = torch.utils.data.DataLoader(train_set, sampler=EpochShuffler(len(train_set), args.seed),
                                               generator=torch.Generator(), **loader_options)
    val_loader = None
    if val_set is not None:
        val_loader = torch.utils.data.DataLoader(val_set, generator=torch.Generator(), **loader_options)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    # Steps count optimizer updates. The last accumulation window of an epoch may be short (Accelerate syncs there).
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.gradient_accumulation_steps)
    max_steps = args.max_steps or steps_per_epoch * args.num_epochs
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    # Stepped by hand once per update (not passed to prepare, which would step it once per process).
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * max_steps), max_steps)
    accelerator.register_for_checkpointing(scheduler)

    run_info = dict(seed=args.seed, global_batch_size=args.global_batch_size, mode=args.mode,
                    per_device_batch_size=args.per_device_batch_size, num_processes=accelerator.num_processes,
                    num_samples=len(train_set), max_steps=max_steps)
    step, start_epoch, resume_batch = 0, 0, 0
    if args.resume:
        checkpoint = find_resume_checkpoint(args)
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            saved = json.load(f)
        changed = {k: (saved["run"][k], run_info[k]) for k in SAME_ON_RESUME if saved["run"][k] != run_info[k]}
        if changed:
            raise SystemExit(f"--resume: {checkpoint} was written with other settings (saved, now): {changed}")
        if accelerator.distributed_type == DistributedType.FSDP:
            materialize_optimizer_state(optimizer)
        accelerator.load_state(checkpoint)
        step, start_epoch, resume_batch = saved["step"], saved["epoch"], saved["batch_in_epoch"]
        log(f"resumed from {checkpoint}: step {step}, epoch {start_epoch}, batch {resume_batch}")

    log(f"{max_steps} steps of {args.global_batch_size} sequences ({args.per_device_batch_size} per device × "
        f"{accelerator.num_processes} processes × {accelerator.gradient_accumulation_steps} accumulation steps), "
        f"lr {args.learning_rate}, mixed precision {mixed_precision}")
    if args.report_to:
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers("mlmamba-finetune", config=config)
    log_file = os.path.join(args.output_dir, "log.jsonl")
    os.makedirs(args.output_dir, exist_ok=True)

    trainable = [p for p in model.parameters() if p.requires_grad]
    progress = tqdm(total=max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="training")
    frozen_towers_eval(model)
    window_loss, window_batches = torch.zeros((), device=accelerator.device), 0
    done = step >= max_steps
    for epoch in range(start_epoch, num_epochs):
        if done:
            break
        train_loader.set_epoch(epoch)  # reaches EpochShuffler.set_epoch
        loader, batch_in_epoch = train_loader, 0
        if epoch == start_epoch and resume_batch:
            loader, batch_in_epoch = accelerator.skip_first_batches(train_loader, resume_batch), resume_batch
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch_in_epoch += 1
            window_loss += loss.detach().float()
            window_batches += 1
            if not accelerator.sync_gradients:
                continue

            # one optimizer update done
            lr = scheduler.get_last_lr()[0]  # the rate this update used
            scheduler.step()
            step += 1
            train_loss = accelerator.reduce(window_loss / window_batches, "mean").item()
            window_loss.zero_()
            window_batches = 0
            progress.update(1)
            progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}")
            if step % args.log_every == 0 or step == max_steps:
                metrics = {"train/loss": train_loss, "train/lr": lr, "train/grad_norm": float(grad_norm),
                           "train/epoch": epoch + batch_in_epoch / len(train_loader)}
                accelerator.log(metrics, step=step)
                if accelerator.is_main_process:
                    with open(log_file, "a") as f:
                        f.write(json.dumps({"step": step, **metrics}) + "\n")
            if val_loader is not None and args.eval_every and step % args.eval_every == 0 and step < max_steps:
                val_loss = evaluate_loss(accelerator, model, val_loader)
                log(f"step {step}: validation loss {val_loss:.4f}")
                accelerator.log({"validation/loss": val_loss}, step=step)

            if step % args.save_every == 0 or step == max_steps:
                # the epoch ends here if this update took its last batch
                at_end = batch_in_epoch == len(train_loader)
                save_checkpoint(accelerator, args, dict(
                    step=step, epoch=epoch + 1 if at_end else epoch, batch_in_epoch=0 if at_end else batch_in_epoch,
                    run=run_info, time=time.strftime("%Y-%m-%d %H:%M:%S"),
                ))
            if args.stop_after_step is not None and step >= args.stop_after_step:
                log(f"stopping after step {step} (--stop_after_step)")
                accelerator.end_training()
                return
            if step >= max_steps:
                done = True
                break
    progress.close()

    if val_loader is not None:
        val_loss = evaluate_loss(accelerator, model, val_loader)
        log(f"final validation loss {val_loss:.4f}")
        accelerator.log({"validation/loss": val_loss}, step=step)
        if accelerator.is_main_process:
            with open(log_file, "a") as f:
                f.write(json.dumps({"step": step, "validation/loss": val_loss}) + "\n")
    save_final(accelerator, args, model, processor, log)
    accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main())
