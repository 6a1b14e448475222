"""Synthetic original checkpoints (the exact key layouts of SPEC §4), tiny pretrained towers, and an independent
reference forward written from SPEC §1 with plain torch ops on the raw source tensors (not the project's modules)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tests.tiny import TINY_IMAGE_SIZE, TINY_IMAGE_TOKEN_ID, TINY_PATCH, TINY_VOCAB

# Tiny shapes with the released structure: LM and MSC share the Mamba-2 mixer shape (d_inner 64, 4 heads of 16,
# state 16, 1 group, conv 4), pre-connector 56 → 32, projector 32 → 128 → 32 → 32.
D_MODEL, D_INNER, HEADS, STATE, KERNEL, LM_LAYERS, MSC_LAYERS, VOCAB = 32, 64, 4, 16, 4, 2, 2, TINY_VOCAB
DINO_WIDTH, SIGLIP_WIDTH = 32, 24
VISION_WIDTH = DINO_WIDTH + SIGLIP_WIDTH
DINO_NATIVE_SIZE = 56  # 7×7 grid, resampled to the 4×4 grid of TINY_IMAGE_SIZE at conversion (37×37 → 27×27 in real life)
CONV_DIM = D_INNER + 2 * STATE
IN_PROJ = 2 * D_INNER + 2 * STATE + HEADS


def _t(gen, *shape, std=0.2, mean=0.0):
    return torch.randn(*shape, generator=gen) * std + mean


def _mamba2_mixer(gen, branches=("",)) -> dict[str, torch.Tensor]:
    sd = {"in_proj.weight": _t(gen, IN_PROJ, D_MODEL), "norm.weight": _t(gen, D_INNER, std=0.1, mean=1.0),
          "out_proj.weight": _t(gen, D_MODEL, D_INNER)}
    for b in branches:
        sd[f"conv1d{b}.weight"] = _t(gen, CONV_DIM, 1, KERNEL, std=0.3)
        sd[f"conv1d{b}.bias"] = _t(gen, CONV_DIM, std=0.1)
        sd[f"dt_bias{b}"] = _t(gen, HEADS, std=0.5, mean=-1.5)
        sd[f"A_log{b}"] = torch.log(torch.rand(HEADS, generator=gen) * 3 + 0.5)
        sd[f"D{b}"] = _t(gen, HEADS, std=0.3, mean=1.0)
    return sd


def mamba2_lm_tensors(gen, prefix="backbone.", embedding="embedding") -> dict[str, torch.Tensor]:
    """mamba_ssm `MambaLMHeadModel` (Mamba-2) keys, lm_head a separate copy of the embedding."""
    sd = {f"{prefix}{embedding}.weight": _t(gen, VOCAB, D_MODEL, std=0.5)}
    for i in range(LM_LAYERS):
        sd[f"{prefix}layers.{i}.norm.weight"] = _t(gen, D_MODEL, std=0.1, mean=1.0)
        sd.update({f"{prefix}layers.{i}.mixer.{k}": v for k, v in _mamba2_mixer(gen).items()})
    sd[f"{prefix}norm_f.weight"] = _t(gen, D_MODEL, std=0.1, mean=1.0)
    sd["lm_head.weight"] = sd[f"{prefix}{embedding}.weight"].clone()
    return sd


def original_mlmamba_checkpoint(seed: int = 0) -> dict:
    """`{"model": {"llm_backbone", "mlp", "bidirectional_mamba", "projector"}}` as the authors' training saves it."""
    gen = torch.Generator().manual_seed(seed)
    msc = {}
    for i in range(MSC_LAYERS):
        msc.update({f"layers.{i}.mixer.{k}": v for k, v in _mamba2_mixer(gen, branches=("", "_b")).items()})
        msc[f"layers.{i}.norm.weight"] = _t(gen, D_MODEL, std=0.1, mean=1.0)
        msc[f"layers.{i}.norm.bias"] = _t(gen, D_MODEL, std=0.1)
        for w in ("w1", "w2", "w3"):
            msc[f"layers.{i}.mlp.{w}.weight"] = _t(gen, D_MODEL, D_MODEL)
            msc[f"layers.{i}.mlp.{w}.bias"] = _t(gen, D_MODEL, std=0.1)
    msc["norm_f.weight"] = _t(gen, D_MODEL, std=0.1, mean=1.0)
    msc["norm_f.bias"] = _t(gen, D_MODEL, std=0.1)
    return {"model": {
        "llm_backbone": mamba2_lm_tensors(gen),
        "mlp": {"0.weight": _t(gen, D_MODEL, VISION_WIDTH), "0.bias": _t(gen, D_MODEL, std=0.1)},
        "bidirectional_mamba": msc,
        "projector": _projector(gen, D_MODEL, 4 * D_MODEL),
    }}


def _projector(gen, width, hidden) -> dict[str, torch.Tensor]:
    return {"projector.0.weight": _t(gen, hidden, width), "projector.0.bias": _t(gen, hidden, std=0.1),
            "projector.2.weight": _t(gen, D_MODEL, hidden), "projector.2.bias": _t(gen, D_MODEL, std=0.1),
            "projector.4.weight": _t(gen, D_MODEL, D_MODEL), "projector.4.bias": _t(gen, D_MODEL, std=0.1)}


COBRA_D_INNER, COBRA_STATE, COBRA_DT_RANK = 64, 8, 4


def original_cobra_checkpoint(seed: int = 0) -> dict:
    """Cobra: `llm_backbone` with the `llm.` prefix (transformers' MambaForCausalLM layout), MLP projector 4× wide."""
    gen = torch.Generator().manual_seed(seed)
    lm = {"llm.backbone.embeddings.weight": _t(gen, VOCAB, D_MODEL, std=0.5)}
    for i in range(LM_LAYERS):
        p = f"llm.backbone.layers.{i}."
        lm[p + "norm.weight"] = _t(gen, D_MODEL, std=0.1, mean=1.0)
        lm[p + "mixer.in_proj.weight"] = _t(gen, 2 * COBRA_D_INNER, D_MODEL)
        lm[p + "mixer.conv1d.weight"] = _t(gen, COBRA_D_INNER, 1, KERNEL)
        lm[p + "mixer.conv1d.bias"] = _t(gen, COBRA_D_INNER, std=0.1)
        lm[p + "mixer.x_proj.weight"] = _t(gen, COBRA_DT_RANK + 2 * COBRA_STATE, COBRA_D_INNER)
        lm[p + "mixer.dt_proj.weight"] = _t(gen, COBRA_D_INNER, COBRA_DT_RANK)
        lm[p + "mixer.dt_proj.bias"] = _t(gen, COBRA_D_INNER, std=0.5, mean=-2.0)
        lm[p + "mixer.A_log"] = torch.log(torch.arange(1, COBRA_STATE + 1).float()).repeat(COBRA_D_INNER, 1)
        lm[p + "mixer.D"] = torch.ones(COBRA_D_INNER)
        lm[p + "mixer.out_proj.weight"] = _t(gen, D_MODEL, COBRA_D_INNER)
    lm["llm.backbone.norm_f.weight"] = _t(gen, D_MODEL, std=0.1, mean=1.0)
    lm["llm.lm_head.weight"] = lm["llm.backbone.embeddings.weight"].clone()
    return {"model": {"llm_backbone": lm, "projector": _projector(gen, VISION_WIDTH, 4 * VISION_WIDTH)}}


def save_tiny_towers(folder: Path, seed: int = 0) -> list[str]:
    """Two pretrained towers saved as transformers folders: DINOv2-with-registers at a larger native grid (so the
    converter must resample its position table) and SigLIP at the tiny size. Three blocks each (the last unused)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=DINO_WIDTH, num_hidden_layers=3, num_attention_heads=2, num_register_tokens=4,
        patch_size=TINY_PATCH, image_size=DINO_NATIVE_SIZE, mlp_ratio=2, layerscale_value=0.5,
    )).eval()
    with torch.no_grad():  # non-trivial tables and tokens (the default init leaves some at zero)
        dino.embeddings.position_embeddings.normal_(0, 0.5)
        dino.embeddings.register_tokens.normal_(0, 0.5)
        dino.embeddings.cls_token.normal_(0, 0.5)
    siglip = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=SIGLIP_WIDTH, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
        patch_size=TINY_PATCH, image_size=TINY_IMAGE_SIZE,
    )).eval()
    paths = [folder / "dino", folder / "siglip"]
    dino.save_pretrained(paths[0])
    siglip.save_pretrained(paths[1])
    return [str(p) for p in paths]


def save_tiny_tokenizer(folder: Path) -> str:
    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    return str(folder)


# ----------------------------------------------------------------------------------------------------------------
# Independent reference forward (SPEC §1), batch 1, written from the formulas
# ----------------------------------------------------------------------------------------------------------------
def ref_tower_features(tower_paths: list[str], pixel_values: torch.Tensor) -> torch.Tensor:
    """Both pretrained towers (HF models as released, untruncated) at the input size: hidden_states[-2], patch tokens
    only, concatenated on channels. DINOv2 interpolates its position table at run time here (bicubic, antialias)."""
    from transformers import AutoModel

    features = []
    for path, pixels in zip(tower_paths, pixel_values.split(3, dim=1)):
        tower = AutoModel.from_pretrained(path).eval()
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        grid = (pixels.shape[-1] // TINY_PATCH) ** 2
        features.append(hidden[:, -grid:])
    return torch.cat(features, dim=-1)[0]  # (tokens, 56)


def ref_rmsnorm(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_layernorm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_silu(x):
    return x / (1 + torch.exp(-x))


def ref_softplus(x):
    return torch.log1p(torch.exp(x))


def ref_linear(x, w, b=None):
    return x @ w.T + (0 if b is None else b)


def ref_mamba2_branch(zxbcdt, conv_w, conv_b, dt_bias, A_log, D, norm_w):
    """One Mamba-2 scan over (L, in_proj) rows: causal conv + SiLU, SSD recurrence step by step with D·x, then the
    gated RMSNorm `norm(y · silu(z))` (1 group). Returns (L, d_inner)."""
    L = zxbcdt.shape[0]
    z, xbc, dt = zxbcdt.split([D_INNER, CONV_DIM, HEADS], dim=-1)
    padded = torch.cat([torch.zeros(KERNEL - 1, CONV_DIM), xbc], dim=0)
    conv = torch.stack([(padded[t:t + KERNEL].T * conv_w[:, 0, :]).sum(-1) + conv_b for t in range(L)])
    xbc = ref_silu(conv)
    x, B, C = xbc.split([D_INNER, STATE, STATE], dim=-1)
    x = x.reshape(L, HEADS, D_INNER // HEADS)
    dt = ref_softplus(dt + dt_bias)  # (L, H)
    A = -torch.exp(A_log)
    h = torch.zeros(HEADS, D_INNER // HEADS, STATE)
    ys = []
    for t in range(L):
        h = torch.exp(dt[t] * A)[:, None, None] * h + (dt[t][:, None] * x[t])[:, :, None] * B[t][None, None, :]
        ys.append((h * C[t][None, None, :]).sum(-1) + D[:, None] * x[t])
    y = torch.stack(ys).reshape(L, D_INNER)
    return ref_rmsnorm(y * ref_silu(z), norm_w)


def ref_lm(embeds, lm: dict, prefix="backbone.", embedding="embedding"):
    """Mamba-2 LM on input embeddings (L, d): pre-norm residual blocks, final norm, tied output projection."""
    residual = embeds
    for i in range(LM_LAYERS):
        p = f"{prefix}layers.{i}."
        h = ref_rmsnorm(residual, lm[p + "norm.weight"])
        zxbcdt = ref_linear(h, lm[p + "mixer.in_proj.weight"])
        y = ref_mamba2_branch(zxbcdt, *(lm[p + f"mixer.{k}"] for k in
                                        ("conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight")))
        residual = residual + ref_linear(y, lm[p + "mixer.out_proj.weight"])
    h = ref_rmsnorm(residual, lm[f"{prefix}norm_f.weight"])
    return h @ lm["lm_head.weight"].T


def ref_mlmamba_logits(checkpoint: dict, tower_paths: list[str], pixel_values, text_ids: list[int]) -> torch.Tensor:
    """Logits (L, vocab) of the released model on [image tokens] + text, from the raw checkpoint tensors."""
    m = {k: {n: t.double() for n, t in v.items()} for k, v in checkpoint["model"].items()}
    feats = ref_tower_features(tower_paths, pixel_values).double()
    h = ref_gelu(ref_linear(feats, m["mlp"]["0.weight"], m["mlp"]["0.bias"]))  # pre-connector
    msc = m["bidirectional_mamba"]
    for i in range(MSC_LAYERS):
        p = f"layers.{i}.mixer."
        zxbcdt = ref_linear(h, msc[p + "in_proj.weight"])
        def branch(rows, b):  # b = "" (forward) or "_b" (backward): conv1d_b.weight, dt_bias_b, A_log_b, D_b
            return ref_mamba2_branch(rows, msc[p + f"conv1d{b}.weight"], msc[p + f"conv1d{b}.bias"],
                                     msc[p + f"dt_bias{b}"], msc[p + f"A_log{b}"], msc[p + f"D{b}"], msc[p + "norm.weight"])

        y_forward = branch(zxbcdt, "")
        y_backward = branch(zxbcdt.flip(0), "_b").flip(0)  # the whole in_proj output read backwards, then re-reversed
        h = h + ref_linear((y_forward + y_backward) / 2, msc[p + "out_proj.weight"])
        q = f"layers.{i}."
        n = ref_layernorm(h, msc[q + "norm.weight"], msc[q + "norm.bias"])
        swiglu = ref_linear(ref_silu(ref_linear(n, msc[q + "mlp.w1.weight"], msc[q + "mlp.w1.bias"]))
                            * ref_linear(n, msc[q + "mlp.w2.weight"], msc[q + "mlp.w2.bias"]),
                            msc[q + "mlp.w3.weight"], msc[q + "mlp.w3.bias"])
        h = h + swiglu
    h = ref_layernorm(h, msc["norm_f.weight"], msc["norm_f.bias"])
    pr = m["projector"]
    h = ref_gelu(ref_linear(h, pr["projector.0.weight"], pr["projector.0.bias"]))
    h = ref_gelu(ref_linear(h, pr["projector.2.weight"], pr["projector.2.bias"]))
    image = ref_linear(h, pr["projector.4.weight"], pr["projector.4.bias"])
    lm = m["llm_backbone"]
    text = lm["backbone.embedding.weight"][torch.tensor(text_ids)]
    return ref_lm(torch.cat([image, text]), lm).float()


def tiny_pixel_values(seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 6, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=gen)


def prompt_ids(text_ids: list[int]) -> list[int]:
    return [TINY_IMAGE_TOKEN_ID] * ((TINY_IMAGE_SIZE // TINY_PATCH) ** 2) + list(text_ids)
