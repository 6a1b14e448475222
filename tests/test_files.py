"""modeling_mlmamba.files: unreadable model files are named, data paths cannot leave their folder."""

import json
import os
import shutil

import pytest

from modeling_mlmamba.cli import DEMO_MODEL
from modeling_mlmamba.files import UserFileError, check_model_folder, confined_path


@pytest.fixture
def folder(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, copy)
    return copy


def test_a_complete_folder_passes(folder):
    check_model_folder(folder)
    check_model_folder("someone/some-hub-id")  # not a local folder: left to from_pretrained


@pytest.mark.parametrize("cut", [0, 5, 100, "half"])
def test_truncated_weights_are_named(folder, cut):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2 if cut == "half" else cut])
    with pytest.raises(UserFileError, match=r"model\.safetensors: the weights file (is empty|is not a complete)"):
        check_model_folder(folder)


def test_truncated_or_wrong_config_is_named(folder):
    config = folder / "config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    with pytest.raises(UserFileError, match=r"config\.json: the model configuration is not valid JSON .*line \d+"):
        check_model_folder(folder)
    config.write_text("[1, 2]")
    with pytest.raises(UserFileError, match=r"config\.json: expected a JSON object"):
        check_model_folder(folder)
    config.unlink()
    with pytest.raises(UserFileError, match=r"not a model folder \(no config\.json; it holds .*model\.safetensors"):
        check_model_folder(folder)


def test_other_json_files_and_missing_weights(folder):
    (folder / "tokenizer_config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(UserFileError, match=r"tokenizer_config\.json: the JSON file is not UTF-8"):
        check_model_folder(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))
    with pytest.raises(UserFileError, match=r"names weight files that are not in .*model-00002\.safetensors"):
        check_model_folder(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserFileError, match=r"no weights \(\*\.safetensors\)"):
        check_model_folder(folder)


def test_confined_path(tmp_path):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    images = tmp_path / "images"
    assert confined_path(images, "sub/a.png") == os.path.join(os.path.realpath(images), "sub", "a.png")
    assert confined_path(images, "sub/../a.png") == os.path.join(os.path.realpath(images), "a.png")
    for name, message in [("../secret.png", "leads outside the image folder"),
                          ("sub/../../secret.png", "leads outside the image folder"),
                          (str(tmp_path / "secret.png"), "is absolute"),
                          ("", "expected an image path"), (None, "expected an image path")]:
        with pytest.raises(UserFileError, match=rf"^data.jsonl:7: .*{message}"):
            confined_path(images, name, "data.jsonl:7")
    os.symlink(tmp_path / "secret.png", images / "link.png")
    with pytest.raises(UserFileError, match="leads outside"):
        confined_path(images, "link.png")
