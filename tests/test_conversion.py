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
    out = run_offline(f"""
        import sys, torch
        assert not any(m == "modeling_mlmamba" or m.startswith("modeling_mlmamba.") for m in sys.modules)
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained({str(converted)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load("inputs.pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0]
        torch.save(logits, "logits.pt")
        from transformers import AutoProcessor  # the processor too, from the folder's own code
        processor = AutoProcessor.from_pretrained({str(converted)!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        print(repr(processor.apply_chat_template([{{"role": "user", "content": "what is in the image ?"}}],
                                                 tokenize=False, add_generation_prompt=True)))
        """, tmp_path)
    logits = torch.load(tmp_path / "logits.pt")
    reference = fx.ref_mlmamba_logits(torch.load(mlmamba_pt), towers, pixels, text_ids)
    assert logits.shape == reference.shape == (16 + len(text_ids), fx.VOCAB)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    assert "<|user|>\\nwhat is in the image ?<|endoftext|>\\n<|assistant|>\\n" in out.stdout


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


def test_converted_folder_carries_processor_and_card(converted):
    files = {p.name for p in converted.iterdir()}
    assert {"processor_config.json", "tokenizer_config.json", "tokenizer.json", "processing_mlmamba.py"} <= files
    card = (converted / "README.md").read_text()
    assert "library_name: transformers" in card and "trust_remote_code=True" in card and "{{" not in card


def test_dinov2_position_table_is_resampled_once_at_conversion(converted, towers):
    """Stored at the new grid (4×4 + CLS) so that no run-time interpolation happens; CLS entry kept as it was."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    stored = {}
    for f in converted.glob("*.safetensors"):
        stored.update(load_file(str(f)))
    table = stored["model.vision_towers.0.embeddings.position_embeddings"]
    pretrained = AutoModel.from_pretrained(towers[0]).embeddings.position_embeddings.detach()
    assert pretrained.shape[1] == 1 + 7 * 7 and table.shape[1] == 1 + 4 * 4
    torch.testing.assert_close(table[:, 0], pretrained[:, 0], rtol=0, atol=0)
    config = json.loads((converted / "config.json").read_text())
    assert [c["image_size"] for c in config["vision_config"]] == [32, 32]
    # the unused last block and final norm of each tower are not stored
    assert not any(k.startswith("model.vision_towers.0.encoder.layer.2.") or "layernorm" in k for k in stored)
    assert "lm_head.weight" not in stored


def test_round_trip_original_to_hf_to_original_is_lossless(converted, mlmamba_pt):
    import export_original

    original = torch.load(mlmamba_pt, weights_only=True)["model"]
    exported = export_original.export(converted)["model"]
    assert sorted(exported) == sorted(original)
    for section in original:
        assert sorted(exported[section]) == sorted(original[section]), section
        for key, tensor in original[section].items():
            assert exported[section][key].dtype == tensor.dtype
            assert torch.equal(exported[section][key], tensor), f"{section}/{key}"


def _write_pt(path: Path, checkpoint) -> Path:
    torch.save(checkpoint, path)
    return path


def _convert_error(tmp_path, towers, mutate) -> str:
    checkpoint = fx.original_mlmamba_checkpoint()
    mutate(checkpoint["model"])
    path = _write_pt(tmp_path / "bad.pt", checkpoint)
    with pytest.raises(common.ConversionError) as err:
        convert_mlmamba_original.convert(path, towers, image_size=32, chunk_size=8, image_token_id=127)
    return str(err.value)


def test_missing_key_is_reported_by_name(tmp_path, towers):
    message = _convert_error(tmp_path, towers, lambda m: m["bidirectional_mamba"].pop("layers.1.mixer.D_b"))
    assert "missing" in message and "model.connector.msc.layers.1.mixer.directions.1.D" in message


def test_unexpected_key_is_reported_by_name(tmp_path, towers):
    message = _convert_error(tmp_path, towers,
                             lambda m: m["bidirectional_mamba"].__setitem__("layers.0.mixer.extra_b", torch.zeros(3)))
    assert "unexpected" in message and "bidirectional_mamba/layers.0.mixer.extra_b" in message


def test_misshaped_key_is_reported_by_name(tmp_path, towers):
    message = _convert_error(tmp_path, towers, lambda m: m["projector"].__setitem__("projector.2.bias", torch.zeros(7)))
    assert "mis-shaped" in message and "projector/projector.2.bias: [7], expected [32]" in message


def test_lm_head_different_from_embedding_is_refused(tmp_path, towers):
    message = _convert_error(tmp_path, towers, lambda m: m["llm_backbone"]["lm_head.weight"].add_(1e-3))
    assert "lm_head.weight differs from the input embedding" in message


class NotATensor:
    pass


def test_pickle_with_non_tensor_payload_is_refused(tmp_path, towers):
    path = _write_pt(tmp_path / "evil.pt", {"model": {"mlp": NotATensor()}})
    with pytest.raises(ValueError, match="evil.pt is not a plain tensor checkpoint"):
        convert_mlmamba_original.convert(path, towers, image_size=32)


def test_interrupted_conversion_leaves_no_output_folder(tmp_path, mlmamba_pt, towers, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "save_generation_config", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_mlmamba_original.main(["--checkpoint", str(mlmamba_pt), "--output", str(out), "--towers", *towers,
                                       "--image-size", "32", "--tokenizer", "none", "--image-token-id", "127"])
    assert list(tmp_path.iterdir()) == [], "half-written output or temporary folder left behind"


def test_existing_output_is_kept_unless_overwrite(tmp_path, mlmamba_pt, towers):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--checkpoint", str(mlmamba_pt), "--output", str(out), "--towers", *towers, "--image-size", "32",
            "--tokenizer", "none", "--image-token-id", "127", "--chunk-size", "8"]
    with pytest.raises(SystemExit):
        convert_mlmamba_original.main(args)
    assert (out / "keep.txt").read_text() == "mine"
    convert_mlmamba_original.main(args + ["--overwrite", "--max-shard-size", "40KB"])
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    # bf16 by default, sharded with an index when asked for small shards
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / f).is_file() for f in shards)
    with safe_open(str(out / shards[0]), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _load_and_generate(folder: Path, text_ids=(5, 17, 42)) -> torch.Tensor:
    from modeling_mlmamba import MLMambaForConditionalGeneration

    model = MLMambaForConditionalGeneration.from_pretrained(folder).eval()
    ids = torch.tensor([fx.prompt_ids(list(text_ids))])
    out = model.generate(input_ids=ids, pixel_values=fx.tiny_pixel_values(), max_new_tokens=4, min_new_tokens=4)
    assert out.shape == (1, ids.shape[1] + 4)
    return model


def test_cobra_conversion_loads_generates_and_round_trips(tmp_path, towers, tokenizer_dir):
    import convert_cobra_original
    import export_original

    checkpoint = fx.original_cobra_checkpoint()
    path = _write_pt(tmp_path / "cobra.pt", checkpoint)
    out = tmp_path / "cobra"
    convert_cobra_original.main(["--checkpoint", str(path), "--output", str(out), "--towers", *towers,
                                 "--image-size", "32", "--tokenizer", tokenizer_dir, "--dtype", "float32",
                                 "--image-token-id", "127"])
    model = _load_and_generate(out)
    assert model.config.text_config.model_type == "mamba" and model.config.connector_type == "mlp"
    assert model.model.connector.pre_connector is None and model.model.connector.msc is None
    assert model.model.connector.projector[0].weight.shape == (4 * fx.VISION_WIDTH, fx.VISION_WIDTH)
    exported = export_original.export(out)["model"]
    for section, tensors in checkpoint["model"].items():
        assert sorted(exported[section]) == sorted(tensors)
        assert all(torch.equal(exported[section][k], t) for k, t in tensors.items())


def _save_mamba2_hf(folder: Path) -> dict:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from tests.tiny import tiny_text_config

    cfg = {k: v for k, v in tiny_text_config().items() if k != "model_type"}
    torch.manual_seed(3)
    lm = Mamba2ForCausalLM(Mamba2Config(**cfg))
    lm.save_pretrained(folder)
    return {k: v.clone() for k, v in lm.state_dict().items()}


def _save_mamba2_mamba_ssm(folder: Path) -> dict:
    """state-spaces/mamba2-* layout: mamba_ssm config.json and pytorch_model.bin (embedding, lm_head stored)."""
    gen = torch.Generator().manual_seed(4)
    sd = fx.mamba2_lm_tensors(gen)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "d_model": fx.D_MODEL, "d_intermediate": 0, "n_layer": fx.LM_LAYERS, "vocab_size": fx.VOCAB,
        "ssm_cfg": {"layer": "Mamba2", "d_state": fx.STATE, "headdim": fx.D_INNER // fx.HEADS, "chunk_size": 8},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 16, "tie_embeddings": True}))
    torch.save(sd, folder / "pytorch_model.bin")
    return sd


@pytest.mark.parametrize("layout", ["transformers", "mamba_ssm", "mamba1"])
def test_build_from_pretrained_loads_generates_and_keeps_the_lm(tmp_path, towers, tokenizer_dir, layout):
    import build_from_pretrained

    lm_dir = tmp_path / "lm"
    if layout == "transformers":
        source = _save_mamba2_hf(lm_dir)
        embedding = source["backbone.embeddings.weight"]
    elif layout == "mamba_ssm":
        source = _save_mamba2_mamba_ssm(lm_dir)
        embedding = source["backbone.embedding.weight"]
    else:
        from transformers import MambaConfig, MambaForCausalLM

        torch.manual_seed(5)
        MambaForCausalLM(MambaConfig(vocab_size=fx.VOCAB, hidden_size=fx.D_MODEL, num_hidden_layers=2, state_size=8,
                                     pad_token_id=0, eos_token_id=0, bos_token_id=0)).save_pretrained(lm_dir)
        embedding = MambaForCausalLM.from_pretrained(lm_dir).backbone.embeddings.weight.detach()
    out = tmp_path / "built"
    build_from_pretrained.main(["--lm", str(lm_dir), "--output", str(out), "--towers", *towers, "--image-size", "32",
                                "--tokenizer", tokenizer_dir, "--dtype", "float32", "--image-token-id", "127"])
    model = _load_and_generate(out)
    assert model.config.text_config.model_type == ("mamba" if layout == "mamba1" else "mamba2")
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    msc = model.model.connector.msc.layers[0].mixer.directions[0]
    assert torch.equal(msc.D, torch.ones_like(msc.D))  # the connector was freshly initialised, Mamba-2 style


def test_verify_logits_accepts_matching_reference_and_rejects_another(converted, mlmamba_pt, towers, tmp_path):
    import verify_logits

    from modeling_mlmamba import MLMambaForConditionalGeneration

    text_ids = [7, 8, 9]
    pixels = fx.tiny_pixel_values()
    reference = fx.ref_mlmamba_logits(torch.load(mlmamba_pt), towers, pixels, text_ids)[None]
    model = MLMambaForConditionalGeneration.from_pretrained(converted).eval()
    inputs = {"input_ids": torch.tensor([text_ids]), "pixel_values": {"dino": pixels[:, :3], "siglip": pixels[:, 3:]}}
    result = verify_logits.compare(model, {**inputs, "logits": reference})
    assert result["max_abs_diff"] < 1e-4 and result["argmax_agreement"] == 1.0
    result = verify_logits.compare(model, {**inputs, "logits": reference[:, 16:] + 0.5})  # text positions only
    assert result["max_abs_diff"] > 0.4


def test_scripts_have_help(tmp_path):
    scripts = ["convert_mlmamba_original", "convert_cobra_original", "build_from_pretrained", "export_original",
               "verify_logits"]
    code = f"""
        import runpy, sys, io, contextlib
        for name in {scripts!r}:
            sys.argv = [f"conversion/{{name}}.py", "--help"]
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                try:
                    runpy.run_path(f"conversion/{{name}}.py", run_name="__main__")
                except SystemExit as exit:
                    assert exit.code == 0, (name, exit.code)
            assert "usage:" in buffer.getvalue(), name
        print("ok")
        """
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
