"""The shipped demo model (modeling_mlmamba/demo_model) and the `mlmamba` command.

The demo model was trained by demo/train.sh on demo/make_data.py's synthetic shapes (train seed 0); the questions
below come from the test split (seed 2), which it never saw. Its images are regenerated here from the seed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "modeling_mlmamba" / "demo_model"
DEMO_IMAGE = DEMO_MODEL / "examples" / "shapes.png"

# (test-split index, question, answer): every question type, "yes" and "no" both, as recipes/evaluate.py asks them.
TEST_SPLIT_QUESTIONS = [
    (1, "Is the red circle below the purple square?", "yes"),
    (2, "What color is the object left of the yellow square?", "blue"),
    (3, "What color is the triangle?", "yellow"),
    (4, "How many objects are there?", "3"),
    (7, "What shape is the yellow object?", "circle"),
    (19, "What shape is right of the red triangle?", "square"),
    (23, "Is the green triangle right of the blue circle?", "no"),
    (28, "Is the purple circle above the yellow square?", "no"),
]


def load_make_data():
    spec = importlib.util.spec_from_file_location("demo_make_data", REPO / "demo" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "modeling_mlmamba", *args], input=stdin, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    """The first test-split records (images written to a temporary folder), regenerated from seed 2."""
    make_data = load_make_data()
    out = tmp_path_factory.mktemp("shapes")
    records = make_data.generate_split(out, "test", max(i for i, _, _ in TEST_SPLIT_QUESTIONS) + 1,
                                       make_data.SPLIT_SEEDS["test"])
    return out / "images", records


def test_generator_still_makes_the_test_split_the_model_was_scored_on(test_split):
    _, records = test_split
    for index, question, answer in TEST_SPLIT_QUESTIONS:
        (_, q, a), = records[index]["qas"]
        assert (q, a) == (question, answer), f"test record {index} changed: the generator is not the one scored"


def test_shipped_model_is_small_and_complete():
    weights = DEMO_MODEL / "model.safetensors"
    assert weights.stat().st_size <= 20 * 1024 * 1024
    for name in ("config.json", "processor_config.json", "tokenizer.json", "modeling_mlmamba.py",
                 "configuration_mlmamba.py", "processing_mlmamba.py", "image_processing_mlmamba.py",
                 "generation_mlmamba.py", "transformers_compat.py", "README.md"):
        assert (DEMO_MODEL / name).is_file(), name
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    assert (config["connector_type"], config["scan_type"], config["text_config"]["model_type"]) == ("msc", "bsm", "mamba2")


def test_shipped_model_carries_the_packages_current_code():
    """The folder's code files are what a Hub user runs: they must be the package's own, byte for byte. After a
    change to modeling_mlmamba/*.py, copy the files into demo_model/ (and check the demo still answers)."""
    package = REPO / "modeling_mlmamba"
    shipped = sorted(p.name for p in DEMO_MODEL.glob("*.py"))
    assert shipped, "no code files in the demo model folder"
    for name in shipped:
        assert (DEMO_MODEL / name).read_bytes() == (package / name).read_bytes(), f"demo_model/{name} is stale"


def test_shipped_model_loads_offline_through_auto_classes_and_answers_test_questions(test_split, tmp_path):
    images, _ = test_split
    cases = [(str(images / f"test/{i:06d}.png"), q, a) for i, q, a in TEST_SPLIT_QUESTIONS]
    script = textwrap.dedent(f"""
        import json, sys, torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        folder = {str(DEMO_MODEL)!r}
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        answers = []
        for path, question, _ in {cases!r}:
            messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": question}}]}}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(images=[Image.open(path)], text=text, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            answers.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        print(json.dumps(answers))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(q, a) for (_, q, a) in cases] == [(q, got) for (_, q, _), got in zip(cases, answers)]


def test_generate_command_prints_the_answer_about_the_included_image():
    result = run_cli("generate", "--image", str(DEMO_IMAGE), "--prompt", "What color is the circle?")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "blue"


def test_chat_command_answers_each_turn_until_end_of_input():
    result = run_cli("chat", "--image", str(DEMO_IMAGE),
                     stdin="How many objects are there?\nWhat shape is the yellow object?\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["4", "square"]


def test_demo_command_runs_the_shipped_model_end_to_end():
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Q: Describe the image.\nA: purple square at top left, blue circle at left, purple triangle at center, " \
           "yellow square at right\n" in result.stdout
    assert "Q: What color is the circle?\nA: blue\n" in result.stdout


def test_cli_reports_a_missing_image_by_name():
    result = run_cli("generate", "--image", "no/such/image.png", "--prompt", "hi")
    assert result.returncode != 0
    assert "no/such/image.png" in result.stderr and "Traceback" not in result.stderr
