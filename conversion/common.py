"""Shared pieces of the conversion scripts: key tables, checkpoint reading, vision towers, folder writing.

Every script in this folder does one job and keeps its logic here:
  - `convert_mlmamba_original.py`  the authors' ML-Mamba `latest-checkpoint.pt` → a transformers folder
  - `convert_cobra_original.py`    the same for Cobra (Mamba-1 LM, MLP connector)
  - `build_from_pretrained.py`     a new ML-Mamba from a pretrained Mamba(-2) LM and towers, connector freshly initialised
  - `export_original.py`           a transformers folder → the original `.pt` layout (the round trip)
  - `verify_logits.py`             the converted model's logits against logits saved from the original code

A converted folder holds everything `from_pretrained(..., trust_remote_code=True)` needs: safetensors shards, `config.json`
with `auto_map`, the code files, the processor/tokenizer (with the chat template), `generation_config.json` and a card.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # the scripts run from a checkout, where the package is not necessarily installed
    sys.path.insert(0, str(REPO_ROOT))

from safetensors.torch import save_file  # noqa: E402
from transformers import AutoConfig, AutoModel, GenerationConfig  # noqa: E402
from transformers.models.mamba.configuration_mamba import MambaConfig  # noqa: E402
from transformers.models.mamba2.configuration_mamba2 import Mamba2Config  # noqa: E402

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration  # noqa: E402
from modeling_mlmamba.configuration_mlmamba import RELEASED_TEXT_CONFIG  # noqa: E402

try:  # optional: a plain loop when tqdm is missing
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    def tqdm(iterable=None, **kwargs):
        return iterable


DEFAULT_TOWERS = ("facebook/dinov2-with-registers-large", "google/siglip-so400m-patch14-384")
DEFAULT_TOKENIZER = "xiuyul/mamba-2.8b-zephyr"  # the GPT-NeoX-20B tokenizer the original loads (SPEC §2)
DEFAULT_IMAGE_SIZE = 384
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ConversionError(ValueError):
    """A checkpoint that does not have the expected layout. The message lists every offending key."""


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ----------------------------------------------------------------------------------------------------------------
def resolve_file(path_or_repo: str, default_filename: str) -> Path:
    """A local file, or `repo_id` / `repo_id:filename` on the Hub (downloaded, or taken from the cache offline)."""
    if os.path.isfile(path_or_repo):
        return Path(path_or_repo)
    if os.path.isdir(path_or_repo):
        candidate = Path(path_or_repo) / default_filename
        if candidate.is_file():
            return candidate
        raise FileNotFoundError(f"{path_or_repo} is a folder without {default_filename}")
    from huggingface_hub import hf_hub_download

    repo_id, _, filename = path_or_repo.partition(":")
    return Path(hf_hub_download(repo_id, filename or default_filename))


def resolve_folder(path_or_repo: str) -> Path:
    """A local folder, or a Hub repo id (snapshot downloaded, or taken from the cache offline)."""
    if os.path.isdir(path_or_repo):
        return Path(path_or_repo)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path_or_repo))


def load_torch_checkpoint(path: str | os.PathLike) -> dict:
    """`torch.load(..., weights_only=True)`: tensors and plain containers only, never arbitrary pickled objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_can_mmap(path))
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} is not a plain tensor checkpoint: it pickles objects other than tensors and containers, which "
            f"is refused (torch.load(weights_only=True) said: {str(err).splitlines()[0]})"
        ) from err


def _can_mmap(path) -> bool:
    # mmap needs the zip format of torch.save (>= 1.6); a legacy file is read into memory instead.
    import zipfile

    return zipfile.is_zipfile(path)


def original_model_sections(checkpoint: dict, path, expected: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """`checkpoint["model"]`: one flat tensor dict per trained module (Prismatic's layout), checked."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConversionError(f"{path}: expected a dict with a 'model' entry (Prismatic checkpoint), got {keys}")
    sections = checkpoint["model"]
    missing = [s for s in expected if s not in sections]
    if missing:
        raise ConversionError(f"{path}: checkpoint['model'] lacks {missing}; it has {sorted(sections)}")
    for name, section in sections.items():
        if not isinstance(section, dict) or not all(isinstance(v, torch.Tensor) for v in section.values()):
            raise ConversionError(f"{path}: checkpoint['model'][{name!r}] is not a dict of tensors")
    return sections


def flatten_sections(sections: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{"mlp": {"0.weight": t}} → {"mlp/0.weight": t}: one namespace for the key tables below."""
    return {f"{section}/{key}": tensor for section, tensors in sections.items() for key, tensor in tensors.items()}


def unflatten_sections(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        section, _, name = key.partition("/")
        out.setdefault(section, {})[name] = tensor
    return out


# ----------------------------------------------------------------------------------------------------------------
# Key tables: (original key pattern, our key pattern), applied in both directions
# ----------------------------------------------------------------------------------------------------------------
# ML-Mamba (SPEC §4). Original keys are "<section>/<key inside that section>". BSM direction 0 is the original forward
# branch (conv1d, dt_bias, A_log, D), direction 1 the backward branch (conv1d_b, dt_bias_b, A_log_b, D_b).
MLMAMBA_KEY_TABLE: list[tuple[str, str]] = [
    (r"llm_backbone/backbone\.embedding\.weight", r"model.language_model.embeddings.weight"),
    (r"llm_backbone/backbone\.layers\.(\d+)\.(.+)", r"model.language_model.layers.\1.\2"),
    (r"llm_backbone/backbone\.norm_f\.weight", r"model.language_model.norm_f.weight"),
    (r"mlp/0\.(weight|bias)", r"model.connector.pre_connector.0.\1"),
    (r"bidirectional_mamba/layers\.(\d+)\.mixer\.(conv1d)\.(weight|bias)", r"model.connector.msc.layers.\1.mixer.directions.0.\2.\3"),
    (r"bidirectional_mamba/layers\.(\d+)\.mixer\.(conv1d)_b\.(weight|bias)", r"model.connector.msc.layers.\1.mixer.directions.1.\2.\3"),
    (r"bidirectional_mamba/layers\.(\d+)\.mixer\.(dt_bias|A_log|D)", r"model.connector.msc.layers.\1.mixer.directions.0.\2"),
    (r"bidirectional_mamba/layers\.(\d+)\.mixer\.(dt_bias|A_log|D)_b", r"model.connector.msc.layers.\1.mixer.directions.1.\2"),
    (r"bidirectional_mamba/layers\.(\d+)\.mixer\.(in_proj|norm|out_proj)\.weight", r"model.connector.msc.layers.\1.mixer.\2.weight"),
    (r"bidirectional_mamba/layers\.(\d+)\.(norm|mlp\.w[123])\.(weight|bias)", r"model.connector.msc.layers.\1.\2.\3"),
    (r"bidirectional_mamba/norm_f\.(weight|bias)", r"model.connector.msc.norm_f.\1"),
    (r"projector/projector\.([024])\.(weight|bias)", r"model.connector.projector.\1.\2"),
]
MLMAMBA_LM_HEAD = "llm_backbone/lm_head.weight"
MLMAMBA_SECTIONS = ("llm_backbone", "mlp", "bidirectional_mamba", "projector")

# Cobra (SPEC §4): the LM in transformers' MambaForCausalLM layout under an `llm.` prefix; projector as ML-Mamba's.
COBRA_KEY_TABLE: list[tuple[str, str]] = [
    (r"llm_backbone/llm\.backbone\.embeddings\.weight", r"model.language_model.embeddings.weight"),
    (r"llm_backbone/llm\.backbone\.layers\.(\d+)\.(.+)", r"model.language_model.layers.\1.\2"),
    (r"llm_backbone/llm\.backbone\.norm_f\.weight", r"model.language_model.norm_f.weight"),
    (r"projector/projector\.([024])\.(weight|bias)", r"model.connector.projector.\1.\2"),
]
COBRA_LM_HEAD = "llm_backbone/llm.lm_head.weight"
COBRA_SECTIONS = ("llm_backbone", "projector")

TIED_KEY = "lm_head.weight"
EMBEDDING_KEY = "model.language_model.embeddings.weight"


def _compile(table):
    return [(re.compile(src), dst) for src, dst in table]


def _reverse_pattern(pattern: str) -> str:
    """The replacement template of a key pattern: each `(...)` group becomes \\1, \\2, … in order."""
    out, depth, group, i = [], 0, 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            if depth == 0:
                out.append(pattern[i + 1])
            i += 2
            continue
        if c == "(":
            if depth == 0:
                group += 1
                out.append(f"\\{group}")
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0:
            out.append(c)
        i += 1
    return "".join(out)


def _regex_of_template(template: str) -> str:
    """Our key template (with \\1 …) → a regex matching our keys; the groups take digits or a key word."""
    parts = re.split(r"(\\\d)", template)
    return "".join(r"([A-Za-z0-9_.]+?)" if re.fullmatch(r"\\\d", p) else re.escape(p) for p in parts)


def rename(key: str, table) -> str | None:
    for pattern, template in table:
        match = pattern.fullmatch(key)
        if match:
            return match.expand(template)
    return None


def forward_table(table: list[tuple[str, str]]):
    """original → ours."""
    return _compile(table)


def reverse_table(table: list[tuple[str, str]]):
    """ours → original. Source groups must come back unchanged, so a reverse match is accepted only if it maps forward
    to the same key (the check in `rename_reverse`)."""
    return [(re.compile(_regex_of_template(dst)), _reverse_pattern(src)) for src, dst in table]


def rename_reverse(key: str, table: list[tuple[str, str]]) -> str | None:
    fwd = forward_table(table)
    for (pattern, template), (src, _dst) in zip(reverse_table(table), table):
        match = pattern.fullmatch(key)
        if match:
            original = match.expand(template)
            if re.fullmatch(src, original) and rename(original, fwd) == key:
                return original
    return None


def map_checked(
    source: dict[str, torch.Tensor],
    expected_shapes: dict[str, tuple[int, ...]],
    rename_fn: Callable[[str], str | None],
    what: str,
) -> dict[str, torch.Tensor]:
    """Rename every source tensor and check the result against the target's keys and shapes.

    Every source tensor must be consumed and every target tensor provided with the right shape; otherwise a
    `ConversionError` lists the unexpected, missing and mis-shaped keys by name.
    """
    out, unexpected, misshaped = {}, [], []
    for key, tensor in source.items():
        target = rename_fn(key)
        if target is None or target not in expected_shapes:
            unexpected.append(key if target is None else f"{key} (→ {target})")
            continue
        if target in out:
            unexpected.append(f"{key} (→ {target}, given twice)")
            continue
        if tuple(tensor.shape) != tuple(expected_shapes[target]):
            misshaped.append(f"{key}: {list(tensor.shape)}, expected {list(expected_shapes[target])} (for {target})")
        out[target] = tensor
    missing = sorted(k for k in expected_shapes if k not in out)
    problems = []
    if missing:
        problems.append(f"missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        problems.append(f"unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
    if misshaped:
        problems.append(f"mis-shaped ({len(misshaped)}): " + "; ".join(sorted(misshaped)))
    if problems:
        raise ConversionError(f"{what} does not match the expected layout:\n  " + "\n  ".join(problems))
    return out


def check_and_tie_lm_head(lm_head: torch.Tensor | None, embedding: torch.Tensor, name: str) -> None:
    """The original stores the output projection as a separate copy of the embedding: it must be equal to be tied."""
    if lm_head is None:
        return
    if lm_head.shape != embedding.shape:
        raise ConversionError(f"{name} has shape {list(lm_head.shape)}, the embedding {list(embedding.shape)}")
    if not torch.equal(lm_head, embedding):
        diff = (lm_head.float() - embedding.float()).abs().max().item()
        raise ConversionError(
            f"{name} differs from the input embedding (max abs difference {diff:g}); the converted model ties them, "
            "so it would change the outputs"
        )


# ----------------------------------------------------------------------------------------------------------------
# Language model configs from tensor shapes
# ----------------------------------------------------------------------------------------------------------------
def _layer_count(keys: Iterable[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def mamba2_config_from_state_dict(
    sd: dict[str, torch.Tensor], prefix: str, embedding_key: str, n_groups: int = 1, chunk_size: int = 256, **overrides
) -> Mamba2Config:
    """A `Mamba2Config` read off mamba_ssm / transformers Mamba-2 tensors (`{prefix}layers.N.mixer.*`).

    Shapes give everything but the number of groups (only groups × state size is visible) and the chunk size.
    """
    n_layers = _layer_count(sd, f"{prefix}layers.")
    if n_layers == 0:
        raise ConversionError(f"no Mamba-2 layers found under {prefix}layers.")
    mixer = f"{prefix}layers.0.mixer."
    vocab, d_model = sd[embedding_key].shape
    d_inner = sd[mixer + "out_proj.weight"].shape[1]
    num_heads = sd[mixer + "A_log"].shape[0]
    conv_dim, _, conv_kernel = sd[mixer + "conv1d.weight"].shape
    group_state = (conv_dim - d_inner) // 2
    if d_inner % d_model or d_inner % num_heads or group_state % n_groups:
        raise ConversionError(f"unexpected Mamba-2 shapes: d_model {d_model}, d_inner {d_inner}, heads {num_heads}")
    expected_in = 2 * d_inner + 2 * group_state + num_heads
    if sd[mixer + "in_proj.weight"].shape[0] != expected_in:
        raise ConversionError(
            f"{mixer}in_proj.weight has {sd[mixer + 'in_proj.weight'].shape[0]} rows, expected {expected_in} "
            f"(2×{d_inner} + 2×{group_state} + {num_heads})"
        )
    kwargs = {**RELEASED_TEXT_CONFIG}
    kwargs.pop("model_type")
    kwargs.update(
        vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers, state_size=group_state // n_groups,
        expand=d_inner // d_model, head_dim=d_inner // num_heads, num_heads=num_heads, n_groups=n_groups,
        conv_kernel=conv_kernel, chunk_size=chunk_size, use_bias=f"{mixer}in_proj.bias" in sd,
        use_conv_bias=f"{mixer}conv1d.bias" in sd,
    )
    kwargs.update(overrides)
    return Mamba2Config(**kwargs)


def mamba1_config_from_state_dict(sd: dict[str, torch.Tensor], prefix: str, embedding_key: str, **overrides) -> MambaConfig:
    """A `MambaConfig` read off Mamba-1 tensors (`{prefix}layers.N.mixer.{in_proj,conv1d,x_proj,dt_proj,A_log,D,out_proj}`)."""
    n_layers = _layer_count(sd, f"{prefix}layers.")
    if n_layers == 0:
        raise ConversionError(f"no Mamba layers found under {prefix}layers.")
    mixer = f"{prefix}layers.0.mixer."
    vocab, d_model = sd[embedding_key].shape
    d_inner, state_size = sd[mixer + "A_log"].shape
    _, time_step_rank = sd[mixer + "dt_proj.weight"].shape
    conv_kernel = sd[mixer + "conv1d.weight"].shape[-1]
    if d_inner % d_model:
        raise ConversionError(f"unexpected Mamba shapes: d_model {d_model}, d_inner {d_inner}")
    kwargs = dict(
        vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers, state_size=state_size,
        expand=d_inner // d_model, intermediate_size=d_inner, time_step_rank=time_step_rank, conv_kernel=conv_kernel,
        use_bias=f"{mixer}in_proj.bias" in sd, use_conv_bias=f"{mixer}conv1d.bias" in sd, layer_norm_epsilon=1e-5,
        residual_in_fp32=True, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )
    kwargs.update(overrides)
    return MambaConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Vision towers
# ----------------------------------------------------------------------------------------------------------------
def _tower_position_table(model_type: str) -> tuple[str, int]:
    """(state-dict key of the absolute position table, number of prefix entries before the patch grid)."""
    if model_type in ("dinov2", "dinov2_with_registers"):
        return "embeddings.position_embeddings", 1  # [1, 1 + grid², D]: CLS entry first, registers have none
    if model_type == "siglip_vision_model":
        return "embeddings.position_embedding.weight", 0  # [grid², D]
    if model_type == "clip_vision_model":
        return "embeddings.position_embedding.weight", 1  # [1 + grid², D]
    raise ConversionError(f"no position-table rule for tower type {model_type!r}")


def resample_position_table(table: torch.Tensor, num_prefix: int, new_grid: int) -> torch.Tensor:
    """Resample an absolute position table to `new_grid`², exactly as timm does once at model creation.

    timm builds the original's DINOv2 (`vit_large_patch14_reg4_dinov2.lvd142m`, pretrained on a 37×37 grid) at
    `img_size=384`; `timm.models.vision_transformer.checkpoint_filter_fn` then calls
    `resample_abs_pos_embed(v, new_size=model.patch_embed.grid_size, num_prefix_tokens=0, interpolation='bicubic',
    antialias=True)` (filter defaults; the reg4 model is `no_embed_class`, its CLS position folded into `cls_token`),
    and `timm/layers/pos_embed.py` does: float32, reshape to (1, D, 37, 37), `F.interpolate(size=(27, 27),
    mode='bicubic', antialias=True)` (align_corners False), back to (1, 729, D), original dtype. The prefix entries
    (here DINOv2's CLS position, which HF keeps in the table) are kept as they are.
    """
    squeeze = table.ndim == 2
    posemb = table.unsqueeze(0) if squeeze else table
    prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ConversionError(f"position table of {grid.shape[1]} patch entries is not a square grid")
    if old != new_grid:
        dim = grid.shape[-1]
        grid = grid.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(table.dtype)
    out = torch.cat([prefix, grid], dim=1)
    return out.squeeze(0) if squeeze else out


def load_tower(path_or_repo: str, image_size: int) -> tuple[object, dict[str, torch.Tensor]]:
    """A pretrained vision tower (HF repo id or folder) → (its vision config at `image_size`, its full state dict).

    Composite checkpoints (SigLIP / CLIP with a text tower) give their vision model only. The position table is
    resampled to the new patch grid here, so that no interpolation happens at run time.
    """
    config = AutoConfig.from_pretrained(path_or_repo)
    if config.model_type in ("siglip", "clip"):
        from transformers import CLIPVisionModel, SiglipVisionModel

        cls = SiglipVisionModel if config.model_type == "siglip" else CLIPVisionModel
    else:
        cls = AutoModel
    tower, info = cls.from_pretrained(path_or_repo, dtype=torch.float32, output_loading_info=True)
    # a tower weight absent from the checkpoint would be silently random: refuse it
    problems = [f"{what}: {', '.join(map(str, info.get(what) or []))}" for what in ("missing_keys", "mismatched_keys")
                if info.get(what)]
    if problems:
        raise ConversionError(f"vision tower {path_or_repo} did not load completely: " + "; ".join(problems))
    vision_config = copy.deepcopy(tower.config)
    state_dict = dict(tower.state_dict())
    key, num_prefix = _tower_position_table(vision_config.model_type)
    new_grid = image_size // vision_config.patch_size
    state_dict[key] = resample_position_table(state_dict[key], num_prefix, new_grid)
    vision_config.image_size = image_size
    for attribute in ("_name_or_path", "architectures"):
        if hasattr(vision_config, attribute):
            setattr(vision_config, attribute, "" if attribute == "_name_or_path" else None)
    return vision_config, state_dict


def tower_state_dict(index: int, tower_sd: dict[str, torch.Tensor], expected: dict[str, tuple], name: str) -> dict:
    """A full tower's tensors → ours (`model.vision_towers.{index}.*`): layers past the feature layer, the final norm and
    any head are dropped (our towers do not build them); everything else must match by name and shape."""
    prefix = f"model.vision_towers.{index}."
    ours = {k[len(prefix):]: s for k, s in expected.items() if k.startswith(prefix)}
    droppable = re.compile(r"(layernorm|post_layernorm|head)\..+|encoder\.layers?\.(\d+)\..+")

    def keep(key):
        if key in ours:
            return key
        match = droppable.fullmatch(key)
        if match and (match.group(2) is None or int(match.group(2)) >= _layer_count(ours, _layer_prefix(ours))):
            return "<dropped>"
        return None

    kept = {k: v for k, v in tower_sd.items() if keep(k) != "<dropped>"}
    mapped = map_checked(kept, ours, keep, f"vision tower {index} ({name})")
    return {prefix + k: v for k, v in mapped.items()}


def _layer_prefix(keys) -> str:
    return "encoder.layer." if any(k.startswith("encoder.layer.") for k in keys) else "encoder.layers."


# ----------------------------------------------------------------------------------------------------------------
# The target model's expected keys and shapes (built on the meta device: no memory, no initialisation)
# ----------------------------------------------------------------------------------------------------------------
def meta_model(config: MLMambaConfig) -> MLMambaForConditionalGeneration:
    with torch.device("meta"):
        return MLMambaForConditionalGeneration(config)


def expected_shapes(model) -> dict[str, tuple[int, ...]]:
    """Every stored tensor of the model (tied `lm_head.weight` left out)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != TIED_KEY}


def fresh_connector_state_dict(config: MLMambaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A newly initialised connector (pre-connector, MSC, projector), with the model's own `_init_weights`."""
    from modeling_mlmamba.modeling_mlmamba import MLMambaConnector

    torch.manual_seed(seed)
    connector = MLMambaConnector(config)
    owner = meta_model(config)  # `_init_weights` is a method; it reads nothing from the model
    connector.apply(owner._init_weights)
    return {f"model.connector.{k}": v for k, v in connector.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# Writing the output folder
# ----------------------------------------------------------------------------------------------------------------
class AtomicFolder:
    """Write into a temporary folder next to `output`, renamed into place only when everything is written.

    An interrupted or failed conversion leaves no `output` (and no temporary folder). An existing non-empty `output` is
    refused unless `overwrite`; then the old folder is renamed aside, the new one renamed in, and the old one deleted.
    """

    def __init__(self, output: str | os.PathLike, overwrite: bool = False):
        self.output = Path(output).resolve()
        self.overwrite = overwrite
        if self.output.exists() and (not self.output.is_dir() or any(self.output.iterdir())) and not overwrite:
            raise FileExistsError(f"{self.output} exists and is not empty; pass --overwrite to replace it")
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.tmp-", dir=self.output.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.output.exists():
            if any(self.output.iterdir()) and not self.overwrite:  # appeared while we were writing
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise FileExistsError(f"{self.output} appeared during the conversion; nothing was replaced")
            aside = self.output.parent / f".{self.output.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.output, aside)
            os.replace(self.tmp, self.output)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(self.tmp, self.output)
        return False


def parse_size(size: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ValueError(f"size {size!r}: expected e.g. 5GB, 500MB")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)])


def save_weights(
    state_dict: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype, max_shard_size: str = "5GB"
) -> list[str]:
    """safetensors shards (+ index when more than one), as `save_pretrained` writes them, one tensor cast at a time."""
    from huggingface_hub import split_torch_state_dict_into_shards

    tensors = {k: v for k, v in state_dict.items() if k != TIED_KEY}
    # Cast floating tensors only; shard by the size they will have.
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    split = split_torch_state_dict_into_shards(
        cast, filename_pattern="model{suffix}.safetensors", max_shard_size=parse_size(max_shard_size)
    )
    files = []
    for filename, names in tqdm(split.filename_to_tensors.items(), desc="writing shards", unit="shard"):
        shard = {name: cast[name].contiguous() for name in names}
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        files.append(filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in cast.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def save_config_and_code(config: MLMambaConfig, folder: Path, dtype: torch.dtype) -> None:
    """`config.json` (with `auto_map`) and the flat code files the Auto classes load with `trust_remote_code`."""
    from transformers.dynamic_module_utils import custom_object_save

    config = copy.deepcopy(config)
    config.dtype = {v: k for k, v in DTYPES.items()}[dtype]
    config.architectures = ["MLMambaForConditionalGeneration"]
    model = meta_model(config)
    custom_object_save(model, folder, config=config)  # copies modeling_mlmamba.py and its relative imports
    config.save_pretrained(folder)


def save_processor(config: MLMambaConfig, tokenizer_source: str, folder: Path) -> None:
    """The processor (image processor for the towers, GPT-NeoX tokenizer with `<image>` and the Zephyr chat template),
    with its code file, as `MLMambaProcessor.from_model_config` builds it."""
    from transformers import AutoTokenizer

    from modeling_mlmamba.processing_mlmamba import MLMambaProcessor

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    MLMambaProcessor.from_model_config(config, tokenizer).save_pretrained(folder)


def save_generation_config(folder: Path, eos_token_id: int = 0) -> None:
    """Greedy, stop at `<|endoftext|>` (id 0), as the original generates."""
    GenerationConfig(eos_token_id=eos_token_id, pad_token_id=eos_token_id, do_sample=False).save_pretrained(folder)


BUILTIN_MODEL_CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
license: {{ license }}
tags:
- mlmamba
- mamba2
- multimodal
- custom_code
---

# {{ model_name }}

{{ description }}

Converted from `{{ source }}` with `conversion/{{ script }}` of modeling-mlmamba.

## How to load

```python
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{{ repo_id }}", trust_remote_code=True, dtype=torch.bfloat16)
processor = AutoProcessor.from_pretrained("{{ repo_id }}", trust_remote_code=True)
```
"""


def save_model_card(folder: Path, **fields: str) -> None:
    """README.md from the repository's `model_card.md` (or a minimal built-in card): `{{ name }}` fields filled in;
    fields this function does not know are left as they are."""
    template_path = REPO_ROOT / "model_card.md"
    template = template_path.read_text() if template_path.is_file() else BUILTIN_MODEL_CARD
    fields = {"license": "apache-2.0", "repo_id": folder.name, "description": "", **fields}
    card = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: str(fields.get(m.group(1), m.group(0))), template)
    (folder / "README.md").write_text(card)


def write_model_folder(
    output: str | os.PathLike,
    config: MLMambaConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    tokenizer: str | None,
    card_fields: dict[str, str],
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> Path:
    """The whole output folder, atomically: weights, config + code, processor, generation config, model card."""
    with AtomicFolder(output, overwrite=overwrite) as tmp:
        save_weights(state_dict, tmp, dtype, max_shard_size)
        save_config_and_code(config, tmp, dtype)
        if tokenizer is not None:
            save_processor(config, tokenizer, tmp)
        save_generation_config(tmp, eos_token_id=0)
        save_model_card(tmp, **card_fields)
    return Path(output).resolve()


def build_config(
    vision_configs: list, text_config, *, image_token_id: int = 50277, **kwargs
) -> MLMambaConfig:
    return MLMambaConfig(vision_config=vision_configs, text_config=text_config, image_token_id=image_token_id, **kwargs)


def load_towers(towers: list[str], image_size: int) -> list[tuple[object, dict[str, torch.Tensor]]]:
    return [load_tower(t, image_size) for t in tqdm(towers, desc="loading vision towers", unit="tower")]


def towers_state_dict(towers: list[str], loaded, expected) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, (_, sd)) in enumerate(zip(towers, loaded)):
        out.update(tower_state_dict(i, sd, expected, name))
    return out


def add_common_arguments(parser) -> None:
    parser.add_argument("--towers", nargs="+", default=list(DEFAULT_TOWERS),
                        help="vision towers, HF repo ids or local folders, in the order their features are concatenated "
                             "(default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                        help="input resolution; position tables are resampled to it once (default: %(default)s)")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                        help="GPT-NeoX tokenizer (repo id or folder; default: %(default)s); 'none' writes no tokenizer")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the stored weights")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def tokenizer_arg(value: str | None) -> str | None:
    return None if value in (None, "", "none") else value


def fail(message: str) -> None:
    """Print a conversion problem without a traceback and exit with status 1."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)
