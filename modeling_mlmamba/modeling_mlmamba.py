"""ML-Mamba as a transformers model.

The data path, top to bottom (Huang & Hu, 2024, arXiv 2407.19832, Fig. 2):

    pixel_values [N, 3 × towers, H, W]
      → vision towers (DINOv2 / SigLIP / CLIP from transformers), features at `vision_feature_layer`,
        prefix tokens dropped, concatenated on channels                        [N, 729, 2176]
      → pre-connector  Linear + GELU                                           [N, 729, 2560]
      → Mamba-2 Scan Connector (MSC): bidirectional (BSM) or cross (CSM) scans [N, 729, 2560]
      → projector  Linear-GELU-Linear-GELU-Linear                              [N, 729, d_model]
      → scattered into the text embeddings at the `<image>` placeholder positions
      → Mamba-2 (or Mamba) language model from transformers → lm_head → logits
      → `generate()` on the cached conv and SSM states (transformers' `DynamicCache`).

The scans in the connector call the same kernel functions as transformers' Mamba-2 language model
(`causal_conv1d_fn`, `mamba2_chunk_scan`): mamba_ssm / causal_conv1d kernels when they are importable,
transformers' torch reference otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import math
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init

from .configuration_mlmamba import MLMambaConfig
from .generation_mlmamba import DecodeGraphRunner, fused_norms, reads_plain_weights
from .transformers_compat import (
    CACHE_NAME,
    Cache,
    GenerationMode,
    GradientCheckpointingLayer,
    cache_output_class,
    generate_output_cache,
    causal_conv1d_fn,
    mamba2_chunk_scan,
    output_cache,
    resolve_cache,
)


# ----------------------------------------------------------------------------------------------------------------
# Scan orders
# ----------------------------------------------------------------------------------------------------------------
def cross_scan_orders(scan_type: str, num_tokens: int, device: torch.device | None = None) -> list[torch.Tensor | None]:
    """The token orders a scan connector reads its (row-major) patch sequence in.

    Returns one entry per scan direction: a permutation `order` of `range(num_tokens)` such that the direction reads
    `x[:, order]`, or `None` for plain row-major (no permutation needed).
      - "bsm": row-major, reversed row-major.
      - "csm": row-major, reversed row-major, column-major, reversed column-major over the square patch grid.
    """
    reverse = torch.arange(num_tokens - 1, -1, -1, device=device)
    if scan_type == "bsm":
        return [None, reverse]
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise ValueError(f"Cross scan needs a square patch grid; got {num_tokens} tokens")
    # column-major: the k-th token read is row (k % grid), column (k // grid)
    k = torch.arange(num_tokens, device=device)
    column_major = (k % grid) * grid + k // grid
    return [None, reverse, column_major, column_major.flip(0)]


# ----------------------------------------------------------------------------------------------------------------
# Mamba-2 Scan Connector
# ----------------------------------------------------------------------------------------------------------------
class GatedRMSNorm(nn.Module):
    """`weight · RMSNorm(y · silu(z))` over groups of `group_size` channels, in float32, rounded to y's dtype before
    the weight multiplies it: Mamba-2's gated norm (gate before the norm), as transformers' Mamba-2 mixer computes it
    from 5.23 (owned here: its name and arguments changed between releases, its arithmetic did not)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-6):
        super().__init__()
        if hidden_size % group_size:
            raise ValueError(f"GatedRMSNorm: hidden_size {hidden_size} is not a multiple of group_size {group_size}")
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        if gate is not None:
            hidden_states = hidden_states * F.silu(gate.to(torch.float32))
        grouped = hidden_states.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * grouped.flatten(-2).to(input_dtype)


class ScanDirection(nn.Module):
    """Parameters a scan direction owns: its causal depthwise conv, dt bias, A (as log) and D skip."""

    def __init__(self, conv_dim: int, conv_kernel: int, num_heads: int):
        super().__init__()
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, conv_kernel, groups=conv_dim, padding=conv_kernel - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.D = nn.Parameter(torch.empty(num_heads))


class ScanConnectorMixer(nn.Module):
    """A Mamba-2 mixer that scans the patch sequence in several orders (BSM: 2, CSM: 4) and averages them.

    One shared `in_proj` gives z, xBC and dt for every token. Each direction reads them in its own order, runs its
    own conv + SSD scan (`D·x` included), applies the shared gated RMSNorm `norm(y · silu(z))`, and is mapped back
    to row-major. `out_proj` takes the mean of the directions. This is the released code's BSM exactly; CSM
    generalises it to the paper's four orders (whether the paper averages or sums is unconfirmed: we average).
    """

    def __init__(self, config: MLMambaConfig):
        super().__init__()
        d_model = config.connector_hidden_size
        self.scan_type = config.scan_type
        self.intermediate_size = config.connector_expand * d_model
        self.head_dim = config.connector_head_dim
        self.num_heads = self.intermediate_size // self.head_dim
        self.n_groups = config.connector_n_groups
        self.state_size = config.connector_state_size
        self.chunk_size = config.connector_chunk_size
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.state_size

        self.in_proj = nn.Linear(d_model, self.intermediate_size + self.conv_dim + self.num_heads, bias=False)
        num_directions = 2 if config.scan_type == "bsm" else 4
        self.directions = nn.ModuleList(
            ScanDirection(self.conv_dim, config.connector_conv_kernel, self.num_heads) for _ in range(num_directions)
        )
        self.norm = GatedRMSNorm(
            self.intermediate_size,
            group_size=self.intermediate_size // self.n_groups,
            eps=config.connector_layer_norm_epsilon,
        )
        self.out_proj = nn.Linear(self.intermediate_size, d_model, bias=False)

    def scan(self, direction: ScanDirection, zxbcdt: torch.Tensor) -> torch.Tensor:
        """One direction on an already reordered projection. zxbcdt: (batch, length, d_inner + conv_dim + heads)."""
        batch, length, _ = zxbcdt.shape
        z, xbc, dt = zxbcdt.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        # (batch, conv_dim, length): channel-last memory, which the causal_conv1d kernel takes as is when its strides
        # are multiples of 8 (the released widths); otherwise (small test widths) a contiguous copy.
        xbc = xbc.transpose(1, 2)
        if xbc.stride(0) % 8 or xbc.stride(2) % 8:
            xbc = xbc.contiguous()
        xbc = causal_conv1d_fn(xbc, direction.conv1d.weight.squeeze(1), direction.conv1d.bias, activation="silu")
        xbc = xbc.transpose(1, 2)
        x, B, C = xbc.split([self.intermediate_size, self.n_groups * self.state_size, self.n_groups * self.state_size], -1)
        y = mamba2_chunk_scan(
            x.reshape(batch, length, self.num_heads, self.head_dim),
            dt,
            -torch.exp(direction.A_log.float()),
            B.reshape(batch, length, self.n_groups, self.state_size),
            C.reshape(batch, length, self.n_groups, self.state_size),
            chunk_size=self.chunk_size,
            D=direction.D,
            dt_bias=direction.dt_bias,
            dt_softplus=True,
            dt_limit=(0.0, float("inf")),
        )
        return self.norm(y.reshape(batch, length, -1), z).to(zxbcdt.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (batch, length, d_model), row-major patches → (batch, length, d_model)."""
        zxbcdt = self.in_proj(hidden_states)
        orders = cross_scan_orders(self.scan_type, hidden_states.shape[1], hidden_states.device)
        y = 0
        for direction, order in zip(self.directions, orders):
            if order is None:
                y = y + self.scan(direction, zxbcdt)
            else:
                inverse = torch.argsort(order)
                y = y + self.scan(direction, zxbcdt[:, order])[:, inverse]
        return self.out_proj(y / len(self.directions))


class SwiGLU(nn.Module):
    """`w3(silu(w1 x) * w2 x)`, all three square with bias, as in the released MSC."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, hidden_size)
        self.w2 = nn.Linear(hidden_size, hidden_size)
        self.w3 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class ScanConnectorLayer(GradientCheckpointingLayer):
    """`h = h + mixer(h)` (no norm before the mixer, as released), then `h = h + swiglu(layernorm(h))` ("msc")."""

    def __init__(self, config: MLMambaConfig):
        super().__init__()
        self.mixer = ScanConnectorMixer(config)
        self.use_swiglu = config.connector_type == "msc"
        if self.use_swiglu:
            self.norm = nn.LayerNorm(config.connector_hidden_size, eps=config.connector_layer_norm_epsilon)
            self.mlp = SwiGLU(config.connector_hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.mixer(hidden_states)
        if self.use_swiglu:
            hidden_states = hidden_states + self.mlp(self.norm(hidden_states))
        return hidden_states


class MambaScanConnector(nn.Module):
    """The MSC: `connector_num_layers` scan layers and a final LayerNorm."""

    def __init__(self, config: MLMambaConfig):
        super().__init__()
        self.layers = nn.ModuleList(ScanConnectorLayer(config) for _ in range(config.connector_num_layers))
        self.norm_f = nn.LayerNorm(config.connector_hidden_size, eps=config.connector_layer_norm_epsilon)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.norm_f(hidden_states)


class MLMambaConnector(nn.Module):
    """Vision features → LM embeddings: pre-connector, MSC (unless "mlp"), projector."""

    def __init__(self, config: MLMambaConfig):
        super().__init__()
        width = config.vision_feature_size
        self.pre_connector = None
        if config.use_pre_connector:
            self.pre_connector = nn.Sequential(nn.Linear(width, config.connector_hidden_size), nn.GELU())
            width = config.connector_hidden_size
        self.msc = None
        if config.connector_type != "mlp":
            if width != config.connector_hidden_size:
                raise ValueError(
                    f"The MSC runs at connector_hidden_size={config.connector_hidden_size}, but its input is {width} "
                    "wide: without a pre-connector the two must be equal"
                )
            self.msc = MambaScanConnector(config)
        d_model = config.text_config.hidden_size
        self.projector = nn.Sequential(
            nn.Linear(width, config.projector_hidden_size),
            nn.GELU(),
            nn.Linear(config.projector_hidden_size, d_model),
            nn.GELU(),
            nn.Linear(d_model, d_model),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pre_connector is not None:
            features = self.pre_connector(features)
        if self.msc is not None:
            features = self.msc(features)
        return self.projector(features)


# ----------------------------------------------------------------------------------------------------------------
# Vision towers
# ----------------------------------------------------------------------------------------------------------------
def build_vision_tower(tower_config, vision_feature_layer: int) -> PreTrainedModel:
    """A transformers vision model that ends at `vision_feature_layer`: later layers, post-norm and heads are not built.

    `hidden_states[vision_feature_layer]` of the full model is then the truncated model's `last_hidden_state`.
    """
    n_layers = tower_config.num_hidden_layers
    keep = vision_feature_layer if vision_feature_layer >= 0 else n_layers + 1 + vision_feature_layer
    tower_config = copy.deepcopy(tower_config)
    tower_config.num_hidden_layers = keep
    if tower_config.model_type == "siglip_vision_model":
        tower_config.vision_use_head = False
    tower = AutoModel.from_config(tower_config)
    # The final norm only feeds the unused last layer's output: replace it so that last_hidden_state is the raw
    # output of the feature layer (Dinov2: `layernorm`; SigLIP: `post_layernorm`; CLIP: `vision_model.post_layernorm`,
    # which only normalises the pooled CLS token, unused here).
    for owner in (tower, getattr(tower, "vision_model", None)):
        for name in ("layernorm", "post_layernorm"):
            if owner is not None and isinstance(getattr(owner, name, None), nn.LayerNorm):
                setattr(owner, name, nn.Identity())
    return tower


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------
# The cache field is `cache` from transformers 5.24 and `cache_params` before (`generate()` reads it back by the
# installed release's name); `outputs.cache` reads it under either.
MLMambaModelOutput = cache_output_class(
    "MLMambaModelOutput",
    [("last_hidden_state", torch.FloatTensor), ("cache", Cache), ("hidden_states", tuple),
     ("image_hidden_states", torch.FloatTensor)],
    doc="""
    last_hidden_state: (batch, seq, d_model), the LM's final-norm output.
    cache: the conv and SSM states after the last position (a `DynamicCache`), when `use_cache`.
    hidden_states: the LM's per-layer outputs, when `output_hidden_states`.
    image_hidden_states: (num_images, image_tokens, d_model), the projected image features, when images were given.
    """,
    module=__name__,
)

MLMambaCausalLMOutput = cache_output_class(
    "MLMambaCausalLMOutput",
    [("loss", torch.FloatTensor), ("logits", torch.FloatTensor), ("cache", Cache), ("hidden_states", tuple),
     ("image_hidden_states", torch.FloatTensor)],
    doc="""
    loss: next-token cross-entropy over `labels` != -100 (shifted inside), when `labels` are given.
    logits: (batch, kept positions, vocab), float32.
    cache, hidden_states, image_hidden_states: as in `MLMambaModelOutput`.
    """,
    module=__name__,
)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
class MLMambaPreTrainedModel(PreTrainedModel):
    config_class = MLMambaConfig
    config: MLMambaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ScanConnectorLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The SSM state cannot be rolled back or re-ordered token-wise: no assisted decoding / contrastive search.
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Connector initialisation (the towers and the LM initialise themselves as transformers models)."""
        if isinstance(module, ScanDirection):
            # Mamba-2's: A = -[1..H], D = 1, dt ~ logUniform(1e-3, 1e-1) stored as softplus⁻¹, conv kaiming-uniform.
            num_heads = module.A_log.shape[0]
            init.copy_(module.A_log, torch.log(torch.arange(1, num_heads + 1, dtype=torch.float32)))
            init.ones_(module.D)
            dt = torch.exp(
                torch.rand(num_heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)
            ).clamp(min=1e-4)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            init.zeros_(module.conv1d.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, GatedRMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)


class MLMambaModel(MLMambaPreTrainedModel):
    """Vision towers + connector + the bare Mamba(-2) backbone (no LM head)."""

    def __init__(self, config: MLMambaConfig):
        super().__init__(config)
        self.vision_towers = nn.ModuleList(
            build_vision_tower(c, config.vision_feature_layer) for c in config.vision_config
        )
        self.connector = MLMambaConnector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        towers = len(self.config.vision_config)
        size = self.config.image_size
        expected = f"[num_images, {3 * towers}, {size}, {size}] (3 channels × {towers} towers)"
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3 * towers, size, size):
            raise ValueError(f"pixel_values must have shape {expected}, got {list(pixel_values.shape)}")

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (num_images, 3 × towers, H, W) → image embeddings (num_images, image_tokens, d_model)."""
        self._check_pixel_values(pixel_values)
        num_patches = self.config.num_image_tokens
        frozen = not any(p.requires_grad for p in self.vision_towers.parameters())
        features = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            for tower, pixels in zip(self.vision_towers, pixel_values.split(3, dim=1)):
                tower_dtype = next(tower.parameters()).dtype
                hidden = tower(pixel_values=pixels.to(tower_dtype)).last_hidden_state
                # prefix tokens (CLS, registers) come first: keep the last grid² tokens, row-major patches
                features.append(hidden[:, -num_patches:])
        features = torch.cat(features, dim=-1)  # (num_images, image_tokens, sum of tower widths)
        connector_dtype = self.connector.projector[0].weight.dtype
        return self.connector(features.to(connector_dtype))

    def get_placeholder_mask(self, input_ids: torch.LongTensor, image_features: torch.Tensor) -> torch.BoolTensor:
        """Boolean (batch, seq) mask of `<image>` positions, checked against the number of image features."""
        mask = input_ids == self.config.image_token_id
        n_tokens = int(mask.sum())
        n_features = image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"Image features and image tokens do not match: tokens: {n_tokens}, features: {n_features} "
                f"({image_features.shape[0]} images × {image_features.shape[1]} tokens each)"
            )
        return mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_params: Cache | None = None,
        **kwargs,
    ) -> MLMambaModelOutput:
        """`cache`: the conv and SSM states to continue (`cache_params`: its name before transformers 5.24)."""
        cache = resolve_cache(cache, cache_params)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")

        image_features = None
        # the GPU fast path's cache (generation_mlmamba.py) replays prompt shapes it has seen before from CUDA graphs
        runner = getattr(cache, "_mlmamba_runner", None)
        if runner is not None:  # decode steps the captured step has not yet written into the states (deferred)
            runner.settle(cache)
        if inputs_embeds is None:
            is_image = input_ids == self.config.image_token_id
            # `<image>` may lie past the embedding table (tokenizers that add it): its embedding is never used.
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
            if pixel_values is not None:
                if runner is not None:
                    image_features = runner.image_features(pixel_values)
                if image_features is None:
                    image_features = self.get_image_features(pixel_values)
                mask = self.get_placeholder_mask(input_ids, image_features)
                inputs_embeds = inputs_embeds.masked_scatter(
                    mask.unsqueeze(-1).to(inputs_embeds.device),
                    image_features.to(inputs_embeds.device, inputs_embeds.dtype),
                )
            elif (cache is None or input_ids.shape[1] > 1) and bool(is_image.any()):  # no sync per token
                raise ValueError(
                    f"input_ids contain {int(is_image.sum())} image tokens (id {self.config.image_token_id}) "
                    "but no pixel_values were given"
                )
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids (to find the <image> positions), not inputs_embeds")

        if runner is not None and not output_hidden_states:
            last_hidden_state = runner.prefill(inputs_embeds, attention_mask, cache)
            if last_hidden_state is not None:
                use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
                return MLMambaModelOutput(
                    last_hidden_state=last_hidden_state,
                    **{CACHE_NAME: cache if use_cache else None},
                    image_hidden_states=image_features,
                )
        # the fast path's norms (as in its captured prefill) also where the prompt runs eagerly (first sight)
        with fused_norms(self.language_model) if runner is not None else contextlib.nullcontext():
            outputs = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                use_cache=use_cache,
                **{CACHE_NAME: cache},
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        return MLMambaModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: output_cache(outputs)},
            hidden_states=outputs.hidden_states,
            image_hidden_states=image_features,
        )


class MLMambaForConditionalGeneration(MLMambaPreTrainedModel, GenerationMixin):
    """ML-Mamba with its LM head: `forward` gives logits (and the loss on `labels`), `generate()` decodes on cached
    SSM states. `AutoModel`, `AutoModelForImageTextToText` and `AutoModelForCausalLM` all load this class."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embeddings.weight"}
    # Modes that decode on the recurrent state: beam search re-orders the per-beam states through the cache's
    # `reorder_cache`. Assisted / prompt-lookup decoding would have to roll the state back: refused (by this list; and
    # by `_is_stateful` before transformers 5.25), as are the Hub-only custom modes (contrastive, DoLa, group /
    # constrained beams).
    _supported_generation_modes = (
        GenerationMode.GREEDY_SEARCH,
        GenerationMode.SAMPLE,
        GenerationMode.BEAM_SEARCH,
        GenerationMode.BEAM_SAMPLE,
    )

    def __init__(self, config: MLMambaConfig):
        super().__init__(config)
        self.model = MLMambaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache_params: Cache | None = None,
        **kwargs,
    ) -> MLMambaCausalLMOutput:
        r"""
        input_ids: (batch, seq) with `config.num_image_tokens` `<image>` ids per image (the processor expands them).
        pixel_values: (num_images, 3 × towers, H, W), images in the order their placeholders appear in the batch.
        labels: (batch, seq), -100 where no loss is taken; shifted inside.
        logits_to_keep: compute logits for the last N positions only (0 = all), or for the given indices.
        cache: the conv and SSM states to continue (`cache_params`: its name before transformers 5.24).
        """
        cache = resolve_cache(cache, cache_params)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :].to(self.lm_head.weight.dtype)).float()

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return MLMambaCausalLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: output_cache(outputs)},
            hidden_states=outputs.hidden_states,
            image_hidden_states=outputs.image_hidden_states,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids,
        inputs_embeds=None,
        use_cache=None,
        attention_mask: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        # the cache travels in `kwargs` under the name this transformers' `generate()` gives it (CACHE_NAME)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            attention_mask=attention_mask,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        # A decode step reads one new (never padded) token against the cached state: padding was zeroed at prefill.
        if use_cache and not is_first_iteration:
            model_inputs["attention_mask"] = None
        return model_inputs

    # ---- fast decoding on a GPU: `generate(..., cache_implementation="static")` (see generation_mlmamba.py) ----
    # Set to False to keep transformers' own handling of static caches (torch.compile with cudagraph trees).
    use_decode_graphs = True

    def _decode_graph_runner(self) -> DecodeGraphRunner | None:
        if not (self.use_decode_graphs and self.device.type == "cuda" and not self.training):
            return None
        if not reads_plain_weights(self):  # e.g. an unmerged PEFT adapter: the step would read the base weights
            return None
        if getattr(self, "_decode_graphs", None) is None:
            self._decode_graphs = DecodeGraphRunner(self, MLMambaCausalLMOutput)
        return self._decode_graphs

    def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, prefill_chunk_size, model_kwargs):
        """A state cache allocated once per batch size and reused, so that the decode graph captured over it stays
        valid across `generate()` calls (SSM states do not grow: `max_cache_len` is irrelevant)."""
        runner = self._decode_graph_runner()
        if runner is None or cache_implementation != "static" or prefill_chunk_size is not None:
            return super()._prepare_static_cache(
                cache_implementation, batch_size, max_cache_len, prefill_chunk_size, model_kwargs
            )
        return runner.cache_for(batch_size)

    def get_compiled_call(self, compile_config):
        """The decode step `generate()` runs on a compileable cache: a CUDA-graph replay of the (compiled) step.

        `compile_config.backend == "eager"` captures the eager kernels without compiling; `mode="max-autotune"`
        lets inductor autotune the step; any other config compiles with inductor's default mode."""
        runner = self._decode_graph_runner()
        if runner is None:
            return super().get_compiled_call(compile_config)
        mode = "default"
        if compile_config is not None and compile_config.backend == "eager":
            mode = None
        elif compile_config is not None and compile_config.mode and "max-autotune" in compile_config.mode:
            mode = "max-autotune-no-cudagraphs"
        runner.set_compile_mode(mode)
        return runner

    def generate(self, *args, **kwargs):
        """transformers' `generate()`. A state cache of the GPU fast path that it hands back (`return_dict_in_generate`)
        holds the true states: the steps whose state writes the decode step deferred are put in first."""
        result = super().generate(*args, **kwargs)
        cache = generate_output_cache(result)
        runner = getattr(cache, "_mlmamba_runner", None)
        if runner is not None:
            runner.settle(cache)
        return result


# save_pretrained copies this file and its relative imports next to the weights (auto_map: see configuration).
MLMambaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["MLMambaPreTrainedModel", "MLMambaModel", "MLMambaForConditionalGeneration", "cross_scan_orders"]
