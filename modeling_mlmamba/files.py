"""The files a user hands us: each one is checked before work starts, and a bad one is named in the error.

Used by the `mlmamba` command, the recipes and the converters (not part of a model folder's code):

    check_model_folder(folder)      every JSON and safetensors file of a local model folder is readable
    confined_path(folder, name)     a path read from a data record, resolved inside the folder it is relative to

Both raise `UserFileError` (a `ValueError`) with a message that names the file, what was expected and what came.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["UserFileError", "check_model_folder", "confined_path", "read_json_file"]


class UserFileError(ValueError):
    """A file the user gave (or a file inside a folder the user gave) that cannot be used; the message names it."""


def read_json_file(path: str | os.PathLike, what: str = "JSON file"):
    """The parsed contents of a JSON file, or UserFileError naming the file and where it stops being JSON."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserFileError(f"{path}: the {what} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise UserFileError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    if not text.strip():
        raise UserFileError(f"{path}: the {what} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserFileError(
            f"{path}: the {what} is not valid JSON ({err.msg}: line {err.lineno}, column {err.colno}); "
            "it may be truncated"
        ) from None


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    if size == 0:
        raise UserFileError(f"{path}: the weights file is empty (0 bytes)")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise UserFileError(
            f"{path}: the weights file is not a complete safetensors file ({size} bytes; safetensors says: {err}); "
            "it may be truncated, re-download or re-convert it"
        ) from None


def check_model_folder(folder: str | os.PathLike) -> None:
    """Raises UserFileError naming the first unreadable file of a local model folder; a Hub id is left alone.

    Checked: config.json is a JSON object; every other top-level *.json parses; the weights index (if any) names
    files that exist; every *.safetensors file has a complete header that covers the file (safetensors' own check,
    which reads the header only, not the tensors).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    config = folder / "config.json"
    if not config.is_file():
        raise UserFileError(f"{folder}: not a model folder (no config.json; it holds {_listing(folder)})")
    if not isinstance(read_json_file(config, "model configuration"), dict):
        raise UserFileError(f"{config}: expected a JSON object (the model configuration)")
    for path in sorted(folder.glob("*.json")):
        if path.name != "config.json":
            read_json_file(path)
    index_path = folder / "model.safetensors.index.json"
    weights = sorted(folder.glob("*.safetensors"))
    if index_path.is_file():
        index = read_json_file(index_path, "weights index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise UserFileError(f"{index_path}: expected a JSON object with a 'weight_map'")
        missing = sorted({name for name in weight_map.values() if not (folder / str(name)).is_file()})
        if missing:
            raise UserFileError(f"{index_path}: names weight files that are not in {folder}: {missing}")
    if not weights and not any(folder.glob("*.bin")):
        raise UserFileError(f"{folder}: no weights (*.safetensors) in the model folder; it holds {_listing(folder)}")
    for path in weights:
        _check_safetensors(path)


def confined_path(folder: str | os.PathLike, name: str, where: str = "") -> str:
    """`folder/name`, resolved (symbolic links and `..` followed), which must lie inside the resolved `folder`.

    A data record's image path is relative to the folder the user named; an absolute path, or one that climbs out
    (`../../etc/passwd`, a link to elsewhere), is refused: a record cannot make us read a file outside that folder.
    `where` (a file:line or row) starts the message.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(name, str) or not name:
        raise UserFileError(f"{prefix}expected an image path relative to {folder}, got {name!r}")
    if os.path.isabs(name):
        raise UserFileError(f"{prefix}image path {name!r} is absolute; it must be relative to the image folder {folder}")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise UserFileError(f"{prefix}image path {name!r} leads outside the image folder {folder} (to {path})")
    return path


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return "nothing"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
