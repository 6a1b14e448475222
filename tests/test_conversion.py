"""Conversion of the released checkpoints: synthetic original checkpoints in the exact SPEC §4 key layouts, tiny towers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests import test_conversion_fixtures as fx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "conversion"))

import common  # noqa: E402
import convert_mlmamba_original  # noqa: E402


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return fx.save_tiny_towers(tmp_path_factory.mktemp("towers"))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return fx.save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def mlmamba_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("original") / "latest-checkpoint.pt"
    torch.save(fx.original_mlmamba_checkpoint(), path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory, mlmamba_pt, towers, tokenizer_dir):
    out = tmp_path_factory.mktemp("converted") / "ml-mamba-tiny"
    convert_mlmamba_original.main([
        "--checkpoint", str(mlmamba_pt), "--output", str(out), "--towers", *towers, "--image-size", "32",
        "--tokenizer", tokenizer_dir, "--dtype", "float32", "--image-token-id", "127", "--chunk-size", "8",
    ])
    return out


def run_offline(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Python in a fresh process that cannot import the repository's package: only the folder's own code exists."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "HF_MODULES_CACHE": str(cwd / "modules")}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_converted_folder_loads_offline_with_its_own_code_and_matches_reference_forward(converted, mlmamba_pt, towers,
                                                                                        tmp_path):
    text_ids = [5, 17, 42, 9, 3]
    pixels = fx.tiny_pixel_values()
    torch.save({"pixel_values": pixels, "input_ids": torch.tensor([fx.prompt_ids(text_ids)])}, tmp_path / "inputs.pt")
    run_offline(f"""
        import sys, torch
        assert not any("modeling_mlmamba" in m for m in sys.modules)
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained({str(converted)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load("inputs.pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0]
        torch.save(logits, "logits.pt")
        """, tmp_path)
    logits = torch.load(tmp_path / "logits.pt")
    reference = fx.ref_mlmamba_logits(torch.load(mlmamba_pt), towers, pixels, text_ids)
    assert logits.shape == reference.shape == (16 + len(text_ids), fx.VOCAB)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_converted_folder_has_every_file(converted):
    files = {p.name for p in converted.iterdir()}
    assert {"config.json", "generation_config.json", "README.md", "configuration_mlmamba.py",
            "modeling_mlmamba.py"} <= files
    assert any(f.endswith(".safetensors") for f in files)
    config = json.loads((converted / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_mlmamba.MLMambaForConditionalGeneration"
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 0 and not generation.get("do_sample", False)
    assert not list(converted.parent.glob(".*tmp-*")), "temporary folder left behind"
