"""Everything this package takes from transformers beyond its public top-level API, in one place.

A converted model folder carries this package's code and runs under whatever transformers its user has installed, so
the differences between releases are resolved here and nowhere else: the other files import from this module, never
from `transformers.models.*`, `transformers.generation.*` or `transformers.cache_utils` directly, and never compare
versions themselves. Importing it checks the installed release against the supported range first.

What changed between the releases we support (one line each; measured release by release, SPEC §7a):
  5.18  first supported: 5.17's `AutoImageProcessor` is a torchvision dummy without torchvision (fixed in 5.18).
  5.23  `MambaRMSNormGated(..., group_size=...)` exists from here; before, the mixer's gated norm has no groups
        (`gated_norm_group_size` answers the full width for it). Our connector's gated norm is our own class.
  5.24  the cache is named `cache` everywhere: `generate()` keeps it in `model_kwargs["cache"]` (no longer picks
        `cache_params` by the class name), `prepare_inputs_for_generation(cache=...)`, `Mamba2Model.forward(cache=...)`,
        outputs' field `cache` (`CACHE_NAME`), `generate()`'s result `cache` (was `past_key_values`); `cache_params` is a deprecated alias until 5.40, and a `ModelOutput` hook
        renames it in constructors, which breaks output classes declaring `cache_params` (`cache_output_class`).
        A model that still reads `cache_params` from `generate()` silently decodes without its state.
  5.25  `MambaRMSNormGated` renamed `Mamba2RMSNormGated` (no alias: `MambaGatedRMSNorm` below); the mixer's conv and
        scan moved into `causal_conv1d_forward` / `mamba2_scan_forward` (hub-kernel replaceable; the four kernel
        functions we call kept their names and arguments); `_is_stateful` is no longer read (only
        `_supported_generation_modes` refuses assisted decoding); transformers requires `kernels`,
        `huggingface-hub>=2.4`.
Unchanged 5.18 → 5.25 (still imported from here, so that a later change has one place to go): `causal_conv1d_fn`,
`causal_conv1d_update`, `mamba2_chunk_scan`, `mamba2_selective_state_update`, `Mamba2RMSNorm`, `Mamba2Model`,
`StaticCache`, the linear-attention cache layers' `conv_states` / `recurrent_states` / `has_previous_state` /
`lazy_initialization`,
`DeferredStopCheck`, `GenerationMixin._prepare_static_cache`, `PreTrainedModel.get_compiled_call`.
"""

from __future__ import annotations

import dataclasses
import re

import transformers

# The supported range is the tested range: CI (`.ci/run`) runs the test suite on the oldest release below, on the
# locked one (`requirements/lock.txt`) and on the newest release on PyPI the day it runs. A new major release is
# refused until it has been tested.
OLDEST_SUPPORTED = (5, 18, 0)
NEXT_UNSUPPORTED_MAJOR = 6


def _release(version: str) -> tuple[int, int, int]:
    """'5.25.0' / '5.26.0.dev0' / '5.24.0rc1' → (5, 25, 0); the numeric release only."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ImportError(f"modeling_mlmamba cannot read the installed transformers version {version!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def supported_range() -> str:
    return f">={'.'.join(map(str, OLDEST_SUPPORTED))},<{NEXT_UNSUPPORTED_MAJOR}"


def check_transformers_version(version: str) -> tuple[int, int, int]:
    """The installed release as a tuple, or an ImportError naming it and the supported range."""
    release = _release(version)
    if release < OLDEST_SUPPORTED or release[0] >= NEXT_UNSUPPORTED_MAJOR:
        raise ImportError(
            f"ML-Mamba (modeling_mlmamba) supports transformers{supported_range()}, but transformers {version} is "
            f'installed. Install a supported release, e.g. `pip install "transformers{supported_range()}"`.'
        )
    return release


TRANSFORMERS_RELEASE = check_transformers_version(transformers.__version__)

# ---- past the check: the internals themselves -------------------------------------------------------------------
from transformers.cache_utils import Cache, StaticCache  # noqa: E402
from transformers.generation import utils as _generation_utils  # noqa: E402
from transformers.generation.utils import GenerationMode  # noqa: E402
from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: E402
from transformers.models.mamba2 import modeling_mamba2 as _mamba2  # noqa: E402
from transformers.models.mamba2.configuration_mamba2 import Mamba2Config  # noqa: E402
from transformers.utils import ModelOutput  # noqa: E402

# The kernel functions of transformers' Mamba-2 (mamba_ssm / causal_conv1d when importable, torch references else).
causal_conv1d_fn = _mamba2.causal_conv1d_fn
causal_conv1d_update = _mamba2.causal_conv1d_update
mamba2_chunk_scan = _mamba2.mamba2_chunk_scan
mamba2_selective_state_update = _mamba2.mamba2_selective_state_update

# The modules of transformers' Mamba-2 LM that the GPU fast path reads the weights of.
Mamba2Model = _mamba2.Mamba2Model
Mamba2RMSNorm = _mamba2.Mamba2RMSNorm
MambaGatedRMSNorm = getattr(_mamba2, "Mamba2RMSNormGated", None) or _mamba2.MambaRMSNormGated  # renamed in 5.25


def gated_norm_group_size(norm) -> int:
    """The group width of the LM mixer's gated RMSNorm (the whole width before 5.23, which has no groups)."""
    return getattr(norm, "group_size", None) or norm.weight.shape[0]


# ---- the cache's name ---------------------------------------------------------------------------------------------
CACHE_NAME = "cache" if TRANSFORMERS_RELEASE >= (5, 24, 0) else "cache_params"


def resolve_cache(cache=None, cache_params=None):
    """The cache a `forward` was given: `cache`, or `cache_params` (its name before 5.24, which `generate()` of those
    releases passes); a ValueError when two different caches were given."""
    if cache is not None and cache_params is not None and cache is not cache_params:
        raise ValueError("Pass the cache once: `cache` and `cache_params` name the same argument")
    return cache if cache is not None else cache_params


def cache_output_class(name: str, fields: list[tuple[str, object]], doc: str, module: str) -> type:
    """A `ModelOutput` dataclass with `fields` (name, type), each defaulting to None, where the name `"cache"` is
    spelled as this release spells it (`CACHE_NAME`); `generate()` reads the cache back from it by that name."""
    spelled = [(CACHE_NAME if field == "cache" else field, kind, dataclasses.field(default=None))
               for field, kind in fields]
    cls = dataclasses.make_dataclass(name, spelled, bases=(ModelOutput,),
                                     namespace={"__doc__": doc, "__module__": module})
    if CACHE_NAME == "cache_params":  # transformers adds the `cache_params` alias itself from 5.24
        cls.cache = property(lambda self: self.cache_params, doc="The cache (`cache_params` before transformers 5.24)")
    return cls


def output_cache(outputs):
    """The cache of a transformers model output (`outputs.cache`, or `outputs.cache_params` before 5.24)."""
    return getattr(outputs, CACHE_NAME)


def generate_output_cache(result):
    """The cache `generate(..., return_dict_in_generate=True)` hands back (`result.cache`; `past_key_values` before
    5.24), or None (a plain tensor of ids, or no cache)."""
    return getattr(result, "cache" if CACHE_NAME == "cache" else "past_key_values", None)


# ---- the linear-attention (Mamba) cache layers --------------------------------------------------------------------
def layer_states(layer) -> tuple:
    """(conv_state, ssm_state) tensors of one cache layer: (batch, conv_dim, kernel) and (batch, heads, head_dim,
    state)."""
    return layer.conv_states[0], layer.recurrent_states[0]


def has_previous_state(layer) -> bool:
    return bool(layer.has_previous_state[0])


def set_has_previous_state(layer, value: bool) -> None:
    """Whether the next forward continues the layer's states (True) or starts from zero (False)."""
    layer.has_previous_state[0] = value


def allocate_layer_states(layer, conv_state, ssm_state) -> None:
    """Gives an empty cache layer its state tensors (kept by reference: a CUDA graph replays against them)."""
    layer.lazy_initialization(conv_states=conv_state, recurrent_states=ssm_state)


def static_state_cache(text_config) -> StaticCache:
    """A `StaticCache` of linear-attention layers (fixed-size conv + SSM states) for a Mamba-2 config."""
    return StaticCache(config=text_config, max_cache_len=1)  # linear-attention layers ignore the length


# ---- generate()'s deferred stop check -----------------------------------------------------------------------------
def deferred_stop_check():
    """transformers' `DeferredStopCheck` class (generate() reads its stop flag one step late), or None."""
    return getattr(_generation_utils, "DeferredStopCheck", None)


__all__ = [
    "CACHE_NAME", "Cache", "allocate_layer_states", "GenerationMode", "GradientCheckpointingLayer", "Mamba2Config", "Mamba2Model",
    "Mamba2RMSNorm", "MambaGatedRMSNorm", "ModelOutput", "StaticCache", "TRANSFORMERS_RELEASE", "cache_output_class",
    "causal_conv1d_fn", "causal_conv1d_update", "check_transformers_version", "deferred_stop_check",
    "gated_norm_group_size", "generate_output_cache", "has_previous_state", "layer_states", "mamba2_chunk_scan",
    "mamba2_selective_state_update", "output_cache", "resolve_cache", "set_has_previous_state", "static_state_cache",
    "supported_range",
]
