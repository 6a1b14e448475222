"""ML-Mamba configuration.

ML-Mamba (Huang & Hu, 2024, arXiv 2407.19832) = vision towers (DINOv2 + SigLIP) → pre-connector →
Mamba-2 Scan Connector (MSC) → projector → a Mamba-2 language model. This file holds the whole
architecture's hyper-parameters; `modeling_mlmamba.py` builds the model from them.
"""

from __future__ import annotations

import copy
from typing import Any

from .transformers_compat import Mamba2Config  # first: checks the installed transformers release

from transformers import AutoConfig, PretrainedConfig  # noqa: E402


# Written into every saved config.json so that the Auto classes find the custom code next to the weights.
# `AutoModel` deliberately maps to the generation class, as custom-code VLMs on the Hub do: it must `generate()`.
AUTO_MAP = {
    "AutoConfig": "configuration_mlmamba.MLMambaConfig",
    "AutoModel": "modeling_mlmamba.MLMambaForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_mlmamba.MLMambaForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_mlmamba.MLMambaForConditionalGeneration",
}

SUPPORTED_VISION_MODEL_TYPES = ("dinov2_with_registers", "dinov2", "siglip_vision_model", "clip_vision_model")
SUPPORTED_TEXT_MODEL_TYPES = ("mamba2", "mamba")
CONNECTOR_TYPES = ("mlp", "msc_basic", "msc")
SSM_STATE_DTYPES = ("auto", "float32", "bfloat16", "float16")
SCAN_TYPES = ("bsm", "csm")

# The released model: DINOv2 ViT-L/14 with 4 registers + SigLIP SO400M/14, both at 384 px, their last block unused.
RELEASED_VISION_CONFIGS = (
    {
        "model_type": "dinov2_with_registers",
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "mlp_ratio": 4,
        "num_register_tokens": 4,
        "patch_size": 14,
        "image_size": 384,
        "layerscale_value": 1.0,
        "layer_norm_eps": 1e-6,
    },
    {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 384,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh",
    },
)
# Mamba-2 2.7B (state-spaces/mamba2-2.7b) in transformers' Mamba2Config terms.
RELEASED_TEXT_CONFIG = {
    "model_type": "mamba2",
    "vocab_size": 50288,
    "hidden_size": 2560,
    "num_hidden_layers": 64,
    "state_size": 128,
    "expand": 2,
    "head_dim": 64,
    "num_heads": 80,
    "n_groups": 1,
    "conv_kernel": 4,
    "chunk_size": 256,
    "use_bias": False,
    "use_conv_bias": True,
    "layer_norm_epsilon": 1e-5,
    "residual_in_fp32": True,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def _as_config(value: Any, what: str, allowed: tuple[str, ...]) -> PretrainedConfig:
    """A sub-config given as a dict (with `model_type`) or a config object → config object, checked."""
    if isinstance(value, PretrainedConfig):
        config = copy.deepcopy(value)
    elif isinstance(value, dict):
        if "model_type" not in value:
            raise ValueError(f"{what} given as a dict needs a 'model_type' (one of {list(allowed)}); got keys {sorted(value)}")
        kwargs = {k: v for k, v in value.items() if k != "model_type"}
        config = AutoConfig.for_model(value["model_type"], **kwargs)
    else:
        raise ValueError(f"{what} must be a dict or a PretrainedConfig, got {type(value).__name__}")
    if config.model_type not in allowed:
        raise ValueError(
            f"Unsupported {what} type {config.model_type!r} ({type(config).__name__}); expected one of {list(allowed)}"
        )
    return config


class MLMambaConfig(PretrainedConfig):
    r"""
    Configuration of an ML-Mamba model. The defaults give the released "ML-Mamba 3B" shapes.

    Args:
        vision_config (`list[dict | PretrainedConfig]`, *optional*):
            One or more vision towers (`dinov2_with_registers`, `dinov2`, `siglip_vision_model`, `clip_vision_model`),
            all run on the same image. Their patch features at `vision_feature_layer` are concatenated on channels,
            in this order. Default: DINOv2-L/14 with 4 registers + SigLIP SO400M/14, both at 384 px.
        text_config (`dict | Mamba2Config | MambaConfig`, *optional*):
            The language model: a `Mamba2Config` (ML-Mamba) or a `MambaConfig` (Cobra-style). Default: Mamba-2 2.7B.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Index into the towers' `hidden_states` (0 = embeddings). Tower layers past it are never built or run.
        connector_type (`str`, *optional*, defaults to `"msc"`):
            `"msc"` (Mamba-2 Scan Connector with SwiGLU, the released one), `"msc_basic"` (without SwiGLU) or
            `"mlp"` (no scan connector: pre-connector and projector only).
        scan_type (`str`, *optional*, defaults to `"bsm"`):
            `"bsm"` (bidirectional scan, released) or `"csm"` (cross scan: four orders over the patch grid).
        connector_num_layers (`int`, *optional*, defaults to 2): MSC layers.
        use_pre_connector (`bool`, *optional*, defaults to `True`):
            `Linear(vision width → connector_hidden_size) + GELU` before the MSC. Cobra has none.
        connector_hidden_size (`int`, *optional*):
            Width of the pre-connector output and the MSC. Defaults to the LM width (2560), or to the vision feature
            width when there is no pre-connector.
        projector_hidden_size (`int`, *optional*):
            Hidden width of the projector `Linear(in→hidden) → GELU → Linear(hidden→d_model) → GELU →
            Linear(d_model→d_model)`. Defaults to 4 × its input width (10240 for the release, 8704 for Cobra).
        connector_expand, connector_head_dim, connector_state_size, connector_n_groups, connector_conv_kernel,
        connector_chunk_size, connector_layer_norm_epsilon:
            Shape of the MSC's Mamba-2 mixers. Default: borrowed from a Mamba-2 LM (expand 2, head dim 64,
            state 128, 1 group, conv 4, chunk 256, eps 1e-5).
        image_token_id (`int`, *optional*, defaults to 50277): the `<image>` placeholder id.
        ssm_state_dtype (`str`, *optional*, defaults to `"auto"`):
            dtype of the SSM state that the GPU fast path (`generate(..., cache_implementation="static")`) decodes
            on. `"auto"`: the language model's dtype, as mamba_ssm's Mamba-2 and the original ML-Mamba code keep it
            (bf16 for a bf16 model: half the state's bytes per step, which is most of a large batch's traffic; the
            state is rounded after each token). `"float32"`: the dtype the prefill hands over, whatever the model's;
            decodes token for token like transformers' plain path. `"bfloat16"` / `"float16"`: that dtype.
    """

    model_type = "mlmamba"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        vision_config: list | tuple | dict | PretrainedConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        vision_feature_layer: int = -2,
        connector_type: str = "msc",
        scan_type: str = "bsm",
        connector_num_layers: int = 2,
        use_pre_connector: bool = True,
        connector_hidden_size: int | None = None,
        projector_hidden_size: int | None = None,
        connector_expand: int | None = None,
        connector_head_dim: int | None = None,
        connector_state_size: int | None = None,
        connector_n_groups: int | None = None,
        connector_conv_kernel: int | None = None,
        connector_chunk_size: int | None = None,
        connector_layer_norm_epsilon: float = 1e-5,
        image_token_id: int = 50277,
        ssm_state_dtype: str = "auto",
        tie_word_embeddings: bool | None = None,
        **kwargs,
    ):
        if connector_type not in CONNECTOR_TYPES:
            raise ValueError(f"Unknown connector_type {connector_type!r}; expected one of {list(CONNECTOR_TYPES)}")
        if scan_type not in SCAN_TYPES:
            raise ValueError(f"Unknown scan_type {scan_type!r}; expected one of {list(SCAN_TYPES)}")

        if vision_config is None:
            vision_config = list(RELEASED_VISION_CONFIGS)
        elif isinstance(vision_config, (dict, PretrainedConfig)):
            vision_config = [vision_config]
        if not isinstance(vision_config, (list, tuple)) or len(vision_config) == 0:
            raise ValueError(f"vision_config must be a non-empty list of vision configs, got {vision_config!r}")
        self.vision_config = [
            _as_config(c, f"vision_config[{i}]", SUPPORTED_VISION_MODEL_TYPES) for i, c in enumerate(vision_config)
        ]
        self.text_config = _as_config(
            RELEASED_TEXT_CONFIG if text_config is None else text_config, "text_config", SUPPORTED_TEXT_MODEL_TYPES
        )

        # Every tower must see the same patch grid: their features are concatenated token by token.
        grids = [(c.image_size // c.patch_size) for c in self.vision_config]
        sizes = [c.image_size for c in self.vision_config]
        if len(set(grids)) != 1 or len(set(sizes)) != 1:
            raise ValueError(
                f"All vision towers must share image size and patch grid; got image sizes {sizes}, grids {grids}"
            )
        for i, c in enumerate(self.vision_config):
            n_layers = c.num_hidden_layers
            if not (-n_layers <= vision_feature_layer <= n_layers) or vision_feature_layer in (0, -n_layers - 1):
                raise ValueError(
                    f"vision_feature_layer={vision_feature_layer} is outside the {n_layers} layers of "
                    f"vision_config[{i}] ({c.model_type})"
                )

        self.vision_feature_layer = vision_feature_layer
        self.connector_type = connector_type
        self.scan_type = scan_type
        self.connector_num_layers = connector_num_layers
        self.use_pre_connector = use_pre_connector
        self.connector_hidden_size = (
            connector_hidden_size
            if connector_hidden_size is not None
            else (self.text_config.hidden_size if use_pre_connector else self.vision_feature_size)
        )
        projector_in = self.connector_hidden_size if (use_pre_connector or connector_type != "mlp") else self.vision_feature_size
        self.projector_hidden_size = projector_hidden_size if projector_hidden_size is not None else 4 * projector_in

        # The MSC mixers borrow the LM's mixer shape when the LM is a Mamba-2 (as the release does).
        lm = self.text_config if isinstance(self.text_config, Mamba2Config) else None
        self.connector_expand = connector_expand if connector_expand is not None else (lm.expand if lm else 2)
        self.connector_head_dim = connector_head_dim if connector_head_dim is not None else (lm.head_dim if lm else 64)
        self.connector_state_size = (
            connector_state_size if connector_state_size is not None else (lm.state_size if lm else 128)
        )
        self.connector_n_groups = connector_n_groups if connector_n_groups is not None else (lm.n_groups if lm else 1)
        self.connector_conv_kernel = (
            connector_conv_kernel if connector_conv_kernel is not None else (lm.conv_kernel if lm else 4)
        )
        self.connector_chunk_size = (
            connector_chunk_size if connector_chunk_size is not None else (lm.chunk_size if lm else 256)
        )
        self.connector_layer_norm_epsilon = connector_layer_norm_epsilon
        if connector_type != "mlp":
            d_inner = self.connector_expand * self.connector_hidden_size
            if d_inner % self.connector_head_dim != 0:
                raise ValueError(
                    f"MSC width {d_inner} (connector_expand × connector_hidden_size) is not a multiple of "
                    f"connector_head_dim={self.connector_head_dim}"
                )
        self.image_token_id = image_token_id
        if ssm_state_dtype not in SSM_STATE_DTYPES:
            raise ValueError(f"ssm_state_dtype must be one of {list(SSM_STATE_DTYPES)}, got {ssm_state_dtype!r}")
        self.ssm_state_dtype = ssm_state_dtype

        if tie_word_embeddings is None:
            tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        # transformers ties input/output embeddings by the top-level flag; keep the LM's own flag in step.
        self.text_config.tie_word_embeddings = tie_word_embeddings
        kwargs["auto_map"] = {**AUTO_MAP, **(kwargs.get("auto_map") or {})}
        kwargs.setdefault("pad_token_id", self.text_config.pad_token_id)
        kwargs.setdefault("eos_token_id", self.text_config.eos_token_id)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # ---- derived quantities ------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.vision_config[0].image_size

    @property
    def patch_grid(self) -> int:
        """Patches per side (27 for 384 px at patch 14)."""
        return self.vision_config[0].image_size // self.vision_config[0].patch_size

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image: the towers' patch grid, flattened row-major (729 for the release)."""
        return self.patch_grid**2

    @property
    def vision_feature_size(self) -> int:
        """Channels of the concatenated tower features (2176 = 1024 + 1152 for the release)."""
        return sum(c.hidden_size for c in self.vision_config)

    # ---- serialisation: `vision_config` is a list, which the base class does not know how to (de)serialise ----
    def to_dict(self) -> dict[str, Any]:
        vision = self.vision_config
        self.vision_config = None
        try:
            output = super().to_dict()
        finally:
            self.vision_config = vision
        output["vision_config"] = []
        for c in vision:
            d = c.to_dict()
            d.pop("transformers_version", None)
            output["vision_config"].append(d)
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        # Always write the whole config: a diff against defaults would make the file depend on library defaults.
        output = self.to_dict()
        output.pop("_name_or_path", None)
        return output


MLMambaConfig.register_for_auto_class()

__all__ = ["MLMambaConfig"]
