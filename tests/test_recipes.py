"""The fine-tuning and evaluation recipes, run as a user runs them (subprocesses), on a tiny model and tiny data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.tiny import tiny_model, tiny_processor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(ROOT, "recipes", "finetune.py")
EVALUATE = os.path.join(ROOT, "recipes", "evaluate.py")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def run(args: list[str], *, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def finetune(data_dir: str, base: str, output_dir: str, *extra: str, launcher=(sys.executable,), check=True):
    """recipes/finetune.py with small-run settings; `extra` overrides them (argparse keeps the last value)."""
    args = [*launcher, FINETUNE, "--model", base, "--data", os.path.join(data_dir, "train.jsonl"),
            "--image_folder", os.path.join(data_dir, "images"), "--output_dir", output_dir,
            "--per_device_batch_size", "2", "--global_batch_size", "4", "--learning_rate", "1e-2",
            "--lora_r", "8", "--lora_alpha", "16", "--num_workers", "0", "--max_length", "64", *extra]
    return run(args, check=check)


def read_log(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a saved tiny base model with its processor, images of plain colours, LLaVA conversations about them
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("base"))
    tiny_model(seed=0).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


def llava_record(colour: str, index: int) -> dict:
    return {"id": f"{colour}-{index}", "image": f"{colour}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": colour}]}


def write_jsonl(path: str, records: list) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("data")
    (folder / "images").mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 40), rgb).save(folder / "images" / f"{name}.png")
    records = [llava_record(c, i) for i in range(3) for c in COLOURS]  # 12 samples
    records.append({"id": "text-only", "conversations": [  # no image: trained on like any other sample
        {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]})
    write_jsonl(str(folder / "train.jsonl"), records)
    return str(folder)


def example_batch(processor, data_dir: str) -> dict:
    """Two conversations with images, collated by the processor, for comparing models' logits."""
    examples = [
        processor.build_training_example(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]},
             {"role": "assistant", "content": colour}],
            images=[Image.open(os.path.join(data_dir, "images", f"{colour}.png")).convert("RGB")],
        )
        for colour in ("red", "blue")
    ]
    return processor.collate_training_examples(examples)


def logits_of(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits


def load_adapter_model(base_model: str, adapter: str):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(base_model, trust_remote_code=True)
    return PeftModel.from_pretrained(base, adapter)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_model, data_dir) -> str:
    """30 LoRA steps on the colour data, with the default checkpointing, merge and tensorboard logging."""
    out = str(tmp_path_factory.mktemp("lora-run"))
    finetune(data_dir, base_model, out, "--max_steps", "30", "--save_every", "1000", "--report_to", "tensorboard")
    return out


# ---------------------------------------------------------------------------------------------------------------
# LoRA: learning, the adapter, the merged model
# ---------------------------------------------------------------------------------------------------------------
def test_help_runs_without_a_model():
    for script in (FINETUNE, EVALUATE):
        assert "usage" in run([sys.executable, script, "--help"]).stdout


def test_lora_training_lowers_the_loss(lora_run):
    log = [r for r in read_log(lora_run) if "train/loss" in r]
    assert [r["step"] for r in log] == list(range(1, 31))
    first = sum(r["train/loss"] for r in log[:2]) / 2
    last = sum(r["train/loss"] for r in log[-5:]) / 5
    assert last < 0.7 * first, f"loss {first:.3f} → {last:.3f}"
    # cosine schedule with 3% warm-up: ceil(0.03 × 30) = 1 warm-up update (at lr 0), then from 1e-2 down towards 0
    lrs = [r["train/lr"] for r in log]
    assert lrs[0] == 0 and lrs[1] == pytest.approx(1e-2) and lrs[-1] < 1e-4
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(os.path.join(lora_run, "logs"))
               for name in files)


def test_lora_targets_in_proj_and_connector_linears_only(lora_run):
    weights = load_file(os.path.join(lora_run, "adapter", "adapter_model.safetensors"))
    targets = {re.sub(r"\.lora_[AB]\.weight$", "", k).removeprefix("base_model.model.") for k in weights}
    assert targets == {
        "model.language_model.layers.0.mixer.in_proj", "model.language_model.layers.1.mixer.in_proj",
        "model.connector.pre_connector.0",
        *(f"model.connector.msc.layers.{i}.{m}" for i in (0, 1) for m in ("mixer.in_proj", "mlp.w1", "mlp.w2", "mlp.w3")),
        *(f"model.connector.projector.{i}" for i in (0, 2, 4)),
    }


def test_saved_adapter_reproduces_the_trained_model(lora_run, base_model, data_dir):
    """The adapter folder, reloaded on the base model, gives the outputs of the trained weights in the last checkpoint."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    processor = tiny_processor()
    batch = example_batch(processor, data_dir)
    reloaded = load_adapter_model(base_model, os.path.join(lora_run, "adapter"))

    # The trained model, rebuilt independently from the checkpoint's raw state dict (Accelerate's model.safetensors).
    config = LoraConfig.from_pretrained(os.path.join(lora_run, "adapter"))
    base = AutoModelForImageTextToText.from_pretrained(base_model, trust_remote_code=True)
    trained = get_peft_model(base, config)
    state = load_file(os.path.join(lora_run, "checkpoints", "step-30", "model.safetensors"))
    missing, unexpected = trained.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # lm_head is tied to the embeddings
    assert any("lora_" in k for k in state)

    torch.testing.assert_close(logits_of(reloaded, batch), logits_of(trained, batch), rtol=0, atol=0)


def test_merged_folder_loads_offline_and_matches_the_adapter_model(lora_run, base_model, data_dir, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    merged_dir = os.path.join(lora_run, "merged")
    files = set(os.listdir(merged_dir))
    assert {"config.json", "model.safetensors", "modeling_mlmamba.py", "configuration_mlmamba.py"} <= files
    assert not any(f.startswith("adapter") for f in files)

    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, trust_remote_code=True)
    assert "lora" not in " ".join(n for n, _ in merged.named_parameters())
    processor = AutoProcessor.from_pretrained(merged_dir, trust_remote_code=True)
    batch = example_batch(processor, data_dir)
    adapter_model = load_adapter_model(base_model, os.path.join(lora_run, "adapter"))
    base = AutoModelForImageTextToText.from_pretrained(base_model, trust_remote_code=True)

    merged_logits = logits_of(merged, batch)
    torch.testing.assert_close(merged_logits, logits_of(adapter_model, batch), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged_logits, logits_of(base, batch), atol=1e-3)  # training changed the model


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and resumption
# ---------------------------------------------------------------------------------------------------------------
def test_resume_after_a_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path, base_model, data_dir):
    # 13 samples, 2 per batch → 7 batches an epoch; 2 accumulation steps → 4 updates an epoch (the last one short).
    # Stopped after update 4 (the end of epoch 0) and after update 6 (mid-epoch 1), each then resumed to 8.
    # LoRA dropout stays on: the resumed run must also continue the random number streams.
    common = ["--max_steps", "8", "--save_every", "2", "--save_total_limit", "10", "--no_merge"]
    straight = str(tmp_path / "straight")
    finetune(data_dir, base_model, straight, *common)

    expected = load_file(os.path.join(straight, "adapter", "adapter_model.safetensors"))
    for stop in (4, 6):
        interrupted = str(tmp_path / f"stopped-at-{stop}")
        finetune(data_dir, base_model, interrupted, *common, "--stop_after_step", str(stop))
        assert not os.path.exists(os.path.join(interrupted, "adapter"))
        assert max(int(d.split("-")[1]) for d in os.listdir(os.path.join(interrupted, "checkpoints"))) == stop
        result = finetune(data_dir, base_model, interrupted, *common, "--resume")
        assert f"resumed from {os.path.join(interrupted, 'checkpoints', f'step-{stop}')}" in result.stdout

        resumed = load_file(os.path.join(interrupted, "adapter", "adapter_model.safetensors"))
        assert resumed.keys() == expected.keys()
        for name in expected:
            assert torch.equal(resumed[name], expected[name]), (stop, name)
        # the same losses after the restart as in the uninterrupted run: same batches, same dropout masks
        losses = lambda d: [(r["step"], r["train/loss"]) for r in read_log(d) if "train/loss" in r]  # noqa: E731
        assert losses(interrupted) == losses(straight)


def test_resume_refuses_a_checkpoint_with_another_batch_layout(tmp_path, base_model, data_dir):
    out = str(tmp_path / "run")
    finetune(data_dir, base_model, out, "--max_steps", "2", "--save_every", "1", "--no_merge", "--stop_after_step", "1")
    result = finetune(data_dir, base_model, out, "--max_steps", "2", "--per_device_batch_size", "4", "--resume",
                      check=False)
    assert result.returncode != 0 and "per_device_batch_size" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------------------------------
def test_ddp_on_two_cpu_processes_trains_like_one_process_with_accumulation(tmp_path, base_model, data_dir):
    """2 processes × batch 2 average the same gradients as 1 process × batch 2 × 2 accumulation steps: process 0 reads
    batches 0, 2, 4, process 1 batches 1, 3, 5, one process all six. (3 updates: the 4th would see the epoch's end,
    where several processes pad their last batches.)"""
    common = ["--max_steps", "3", "--lora_dropout", "0", "--save_every", "1000"]
    ddp = str(tmp_path / "ddp")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # Two CPU processes with the gloo backend. (`accelerate launch --cpu --num_processes 2` starts one process unless
    # MPI is set up: torchrun through --multi_gpu, told to stay on the CPU, starts two.)
    result = finetune(data_dir, base_model, ddp, *common,
                      launcher=("env", "ACCELERATE_USE_CPU=1", accelerate, "launch", "--multi_gpu", "--num_processes",
                                "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"))
    assert "2 processes × 1 accumulation steps" in result.stdout
    single = str(tmp_path / "single")
    finetune(data_dir, base_model, single, *common)

    ddp_weights = load_file(os.path.join(ddp, "adapter", "adapter_model.safetensors"))
    single_weights = load_file(os.path.join(single, "adapter", "adapter_model.safetensors"))
    for name in single_weights:
        torch.testing.assert_close(ddp_weights[name], single_weights[name], rtol=1e-3, atol=1e-5)

    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(os.path.join(ddp, "merged"), trust_remote_code=True)
    batch = example_batch(tiny_processor(), data_dir)
    adapter_model = load_adapter_model(base_model, os.path.join(ddp, "adapter"))
    torch.testing.assert_close(logits_of(merged, batch), logits_of(adapter_model, batch), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Other data sources and modes
# ---------------------------------------------------------------------------------------------------------------
def test_datasets_dataset_with_messages_and_images_columns(tmp_path, base_model, data_dir):
    import datasets

    rows = {"messages": [], "images": []}
    for colour in COLOURS:
        rows["messages"].append([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": colour}]},
        ])
        rows["images"].append([Image.open(os.path.join(data_dir, "images", f"{colour}.png"))])
    rows["messages"].append([{"role": "user", "content": [{"type": "text", "text": "Say hello."}]},
                             {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}])
    rows["images"].append([])
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.List(datasets.Image()),
    }))
    datasets.DatasetDict({"train": ds, "validation": ds.select([0, 4])}).save_to_disk(str(tmp_path / "ds"))

    out = str(tmp_path / "run")
    result = run([sys.executable, FINETUNE, "--model", base_model, "--dataset", str(tmp_path / "ds"),
                  "--validation_data", "validation", "--output_dir", out, "--per_device_batch_size", "2",
                  "--global_batch_size", "2", "--max_steps", "3", "--num_workers", "0", "--no_merge"])
    assert "5 training samples, 2 validation samples" in result.stdout
    assert "final validation loss" in result.stdout
    assert os.path.exists(os.path.join(out, "adapter", "adapter_model.safetensors"))


@pytest.mark.parametrize("mode", ["full", "align"])
def test_full_and_align_modes_train_what_they_should(tmp_path, base_model, data_dir, mode):
    out = str(tmp_path / mode)
    finetune(data_dir, base_model, out, "--mode", mode, "--max_steps", "2", "--learning_rate", "1e-3")
    before = load_file(os.path.join(base_model, "model.safetensors"))
    after = load_file(os.path.join(out, "merged", "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert not any(k.startswith("model.vision_towers.") for k in changed)  # towers always frozen
    in_lm = any(k.startswith("model.language_model.") for k in changed)
    assert in_lm == (mode == "full")
    assert any(k.startswith("model.connector.") for k in changed)


# ---------------------------------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def bad_data(tmp_path, data_dir) -> str:
    """Line 3: an image that does not exist; line 5: not JSON; the rest fine."""
    lines = [llava_record("red", 0), llava_record("blue", 0), {**llava_record("red", 1), "image": "missing.png"},
             llava_record("green", 0), '{"image": "red.png", "conversations": [', llava_record("yellow", 0)]
    write_jsonl(str(tmp_path / "train.jsonl"), lines)
    os.symlink(os.path.join(data_dir, "images"), tmp_path / "images")
    return str(tmp_path)


def test_bad_data_stops_the_run_with_the_file_and_line(bad_data, base_model, tmp_path):
    result = finetune(bad_data, base_model, str(tmp_path / "run"), "--max_steps", "1", check=False)
    assert result.returncode != 0
    assert "train.jsonl:3" in result.stderr and "missing.png" in result.stderr

    # a .json file (one array) that does not parse: reported with its line
    broken = os.path.join(bad_data, "broken.json")
    with open(broken, "w") as f:
        f.write('[\n  {"image": "red.png", "conversations": []},\n  {"image": \n]\n')
    result = finetune(bad_data, base_model, str(tmp_path / "run"), "--data", broken, check=False)
    assert result.returncode != 0 and "broken.json:4" in result.stderr and "malformed JSON" in result.stderr


def test_bad_data_skipped_when_asked_and_counted(bad_data, base_model, tmp_path):
    out = str(tmp_path / "run")
    result = finetune(bad_data, base_model, out, "--max_steps", "1", "--on_bad_sample", "skip", "--no_merge")
    assert "train.jsonl:3: image file not found" in result.stdout and "missing.png" in result.stdout
    assert "train.jsonl:5: malformed JSON" in result.stdout
    assert "skipped 2 bad sample(s), kept 4" in result.stdout
    assert "4 training samples" in result.stdout
    assert os.path.exists(os.path.join(out, "adapter"))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def test_evaluate_scores_batched_predictions(lora_run, data_dir, tmp_path):
    """Batch size 1 gives the model's answers; batches of 3 (left-padded) must give the same ones, and the scores
    follow the documented normalisation (case, whitespace, final punctuation)."""
    model = os.path.join(lora_run, "merged")
    questions = [{"image": f"{c}.png", "question": q, "answer": "?"} for c, q in
                 [("red", "What colour is this?"), ("blue", "Colour?"), ("green", "What colour is this image, please?"),
                  ("yellow", "What colour is this?")]]
    questions.append({"question": "Say hello.", "answer": "?"})
    data = str(tmp_path / "eval.jsonl")
    write_jsonl(data, questions)
    common = [sys.executable, EVALUATE, "--model", model, "--data", data,
              "--image_folder", os.path.join(data_dir, "images"), "--max_new_tokens", "6"]
    run([*common, "--batch_size", "1", "--output", str(tmp_path / "alone.jsonl")])
    with open(tmp_path / "alone.jsonl") as f:
        alone = [json.loads(line)["prediction"] for line in f]
    assert any(alone), "the model predicted only empty strings: the test would prove nothing"

    # answers: 0-1 the prediction in upper case with a final full stop and extra spaces (exact match),
    # 2 a word of the prediction (contains), 3-4 something else entirely
    answers = [f"  {alone[0].upper()} .", f"{alone[1]}!", alone[2].split()[0] if alone[2].split() else "",
               "zzzz zz", ["qqqq", "zzzz"]]
    write_jsonl(data, [{**q, "answer": a} for q, a in zip(questions, answers)])
    result = run([*common, "--batch_size", "3", "--output", str(tmp_path / "batched.jsonl")])
    with open(tmp_path / "batched.jsonl") as f:
        batched = [json.loads(line) for line in f]
    assert [r["prediction"] for r in batched] == alone
    assert [r["exact_match"] for r in batched][:2] == [True, True]
    assert [r["exact_match"] for r in batched][3:] == [False, False]
    exact = sum(r["exact_match"] for r in batched)
    contains = sum(r["contains_answer"] for r in batched)
    assert batched[2]["contains_answer"]
    assert f"exact match {100 * exact / 5:.2f}%, contains answer {100 * contains / 5:.2f}%" in result.stdout


def test_optimizer_state_is_materialized_without_moving_any_parameter():
    """Before an FSDP resume the optimizer needs its per-parameter entries (Adam creates them at its first step), or
    the sharded load has nowhere to put the saved moments. Creating them must leave every parameter, the learning
    rates and the gradients as they were; loading a real state afterwards must overwrite them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_module", FINETUNE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    net[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    groups = [{"params": [net[1].weight], "weight_decay": 0.1},
              {"params": [net[0].bias, net[1].bias], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    module.materialize_optimizer_state(optimizer)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-2]
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(optimizer.state) == len(trainable) and all(p.grad is None for p in net.parameters())
    assert all(set(optimizer.state[p]) >= {"exp_avg", "exp_avg_sq", "step"} for p in trainable)
    # a trained optimizer's state loads over the placeholders
    trained = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups], lr=1e-2)
    net(torch.randn(5, 4)).sum().backward()
    trained.step()
    optimizer.load_state_dict(trained.state_dict())
    assert torch.equal(optimizer.state[net[1].weight]["exp_avg"], trained.state[net[1].weight]["exp_avg"])
