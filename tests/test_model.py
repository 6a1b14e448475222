"""The model as a specification: architecture, cached generation, the scan connector, saving and training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration
from modeling_mlmamba.modeling_mlmamba import ScanConnectorMixer
from tests.tiny import image_prompt_ids, tiny_config, tiny_model


# ---------------------------------------------------------------------------------------------------------------
# Generation on cached SSM states
# ---------------------------------------------------------------------------------------------------------------
def greedy_by_full_recompute(model, input_ids, pixel_values, steps):
    """Reference decoding: the whole sequence through the model again at every step, no cache."""
    ids = input_ids
    step_logits = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixel_values, use_cache=False).logits[:, -1]
        step_logits.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1]:], torch.stack(step_logits, 1)


def test_cached_generation_matches_full_forward():
    model = tiny_model(seed=1)
    config = model.config
    input_ids = image_prompt_ids(config, [5, 17, 33, 9, 41])
    pixel_values = torch.randn(1, 6, config.image_size, config.image_size)
    steps = 24

    expected_tokens, expected_logits = greedy_by_full_recompute(model, input_ids, pixel_values, steps)
    out = model.generate(
        input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=steps, do_sample=False,
        eos_token_id=None, output_logits=True, return_dict_in_generate=True,
    )
    new_tokens = out.sequences[:, input_ids.shape[1]:]
    assert new_tokens.shape[1] == steps
    assert torch.equal(new_tokens, expected_tokens)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected_logits, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_generates_what_each_sample_generates_alone():
    model = tiny_model(seed=2)
    config = model.config
    prompts = [image_prompt_ids(config, [5, 17, 33, 9, 41, 8, 3]), image_prompt_ids(config, [12, 6])]
    images = [torch.randn(1, 6, 32, 32), torch.randn(1, 6, 32, 32)]
    alone = [
        model.generate(input_ids=p, pixel_values=im, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, p.shape[1]:]
        for p, im in zip(prompts, images)
    ]
    width = max(p.shape[1] for p in prompts)
    pad = config.pad_token_id
    batch_ids = torch.stack([F.pad(p[0], (width - p.shape[1], 0), value=pad) for p in prompts])
    attention = torch.stack([F.pad(torch.ones(p.shape[1], dtype=torch.long), (width - p.shape[1], 0)) for p in prompts])
    together = model.generate(
        input_ids=batch_ids, attention_mask=attention, pixel_values=torch.cat(images), max_new_tokens=12,
        do_sample=False, eos_token_id=None,
    )[:, width:]
    for i in range(2):
        assert torch.equal(together[i], alone[i]), f"sample {i}"


def test_generation_stops_at_eos_and_respects_max_new_tokens():
    model = tiny_model(seed=3)
    ids = image_prompt_ids(model.config, [4, 5, 6])
    pv = torch.randn(1, 6, 32, 32)
    free = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=10, do_sample=False, eos_token_id=None)
    new = free[0, ids.shape[1]:]
    assert new.numel() == 10
    # declare the third generated token the EOS: generation must stop right there
    eos = int(new[2])
    first = int((new == eos).nonzero()[0])
    stopped = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    assert stopped[0, ids.shape[1]:].tolist() == new[: first + 1].tolist()


def test_sampling_and_streamer_run_on_the_cache():
    from transformers import TextStreamer

    class CollectingStreamer(TextStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.extend(value.flatten().tolist())

        def end(self):
            pass

    model = tiny_model(seed=4)
    ids = image_prompt_ids(model.config, [4, 5, 6])
    pv = torch.randn(1, 6, 32, 32)
    streamer = CollectingStreamer()
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=8, do_sample=True, top_k=5,
                         eos_token_id=None, streamer=streamer)
    # the streamer first receives the prompt, then every new token in order
    assert streamer.tokens == out[0].tolist()


def test_beam_search_on_the_cache_equals_beam_search_recomputing_everything():
    model = tiny_model(seed=3)
    ids = torch.cat([image_prompt_ids(model.config, [5, 6, 7, 8]), image_prompt_ids(model.config, [9, 10, 11, 12])])
    pv = torch.randn(2, 6, 32, 32)
    kwargs = dict(input_ids=ids, pixel_values=pv, num_beams=3, max_new_tokens=12, eos_token_id=None, do_sample=False)
    assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))


@pytest.mark.parametrize("kwargs", [dict(prompt_lookup_num_tokens=2), dict(num_beams=2, num_beam_groups=2, diversity_penalty=1.0)])
def test_unsupported_generation_modes_fail_clearly(kwargs):
    model = tiny_model()
    ids = image_prompt_ids(model.config, [4, 5, 6])
    with pytest.raises(ValueError, match="generation mode|stateful|only supports|custom_generate|trust_remote_code"):
        model.generate(input_ids=ids, pixel_values=torch.randn(1, 6, 32, 32), max_new_tokens=3, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The Mamba-2 Scan Connector against a slow step-by-step reference (SPEC §1.3)
# ---------------------------------------------------------------------------------------------------------------
def reference_scan_orders(scan_type, grid):
    """Orders written from the paper: row-major, reversed; column-major, reversed (CSM only)."""
    positions = torch.arange(grid * grid).reshape(grid, grid)  # positions[row, col] = row-major index
    row_major = positions.flatten()
    column_major = positions.t().flatten()
    orders = [row_major, row_major.flip(0)]
    if scan_type == "csm":
        orders += [column_major, column_major.flip(0)]
    return orders


def slow_scan_mixer(mixer, h, orders):
    """One token at a time, in float64: conv window, SSM recurrence h_t = exp(dt·A) h_{t-1} + dt·B_t x_t,
    y_t = C_t h_t + D x_t, gated RMSNorm norm(y · silu(z)), back to row-major, mean of directions, out_proj."""
    d = lambda t: t.detach().double()
    batch, length, _ = h.shape
    d_inner, heads, head_dim, n = mixer.intermediate_size, mixer.num_heads, mixer.head_dim, mixer.state_size
    zxbcdt = d(h) @ d(mixer.in_proj.weight).t()
    outputs = []
    for direction, order in zip(mixer.directions, orders):
        seq = zxbcdt[:, order]
        z, xbc, dt = seq[..., :d_inner], seq[..., d_inner:d_inner + d_inner + 2 * n], seq[..., -heads:]
        w, b = d(direction.conv1d.weight)[:, 0], d(direction.conv1d.bias)  # (channels, K)
        K = w.shape[1]
        conv = torch.zeros_like(xbc)
        for t in range(length):
            acc = b.clone().expand(batch, -1).clone()
            for k in range(K):
                src = t - (K - 1) + k
                if src >= 0:
                    acc = acc + w[:, k] * xbc[:, src]
            conv[:, t] = acc
        xbc = conv * torch.sigmoid(conv)
        x, B, C = xbc[..., :d_inner], xbc[..., d_inner:d_inner + n], xbc[..., d_inner + n:]
        dt = F.softplus(dt + d(direction.dt_bias))
        A = -torch.exp(d(direction.A_log))
        state = torch.zeros(batch, heads, head_dim, n, dtype=torch.float64)
        y = torch.zeros(batch, length, heads, head_dim, dtype=torch.float64)
        for t in range(length):
            xt = x[:, t].reshape(batch, heads, head_dim)
            decay = torch.exp(dt[:, t] * A)[:, :, None, None]
            state = decay * state + (dt[:, t, :, None, None] * xt[..., None]) * B[:, t, None, None, :]
            y[:, t] = (state * C[:, t, None, None, :]).sum(-1) + d(direction.D)[None, :, None] * xt
        y = y.reshape(batch, length, d_inner) * F.silu(z)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + mixer.norm.variance_epsilon) * d(mixer.norm.weight)
        back = torch.empty_like(y)
        back[:, order] = y  # token read k-th sits at row-major position order[k]
        outputs.append(back)
    return (sum(outputs) / len(outputs)) @ d(mixer.out_proj.weight).t()


@pytest.mark.parametrize("scan_type", ["bsm", "csm"])
def test_scan_mixer_matches_step_by_step_reference(scan_type):
    torch.manual_seed(0)
    config = tiny_config(scan_type=scan_type, connector_chunk_size=4)  # chunk < 16 tokens: several chunks
    model = MLMambaForConditionalGeneration(config)
    mixer = model.model.connector.msc.layers[0].mixer
    assert isinstance(mixer, ScanConnectorMixer)
    assert len(mixer.directions) == (2 if scan_type == "bsm" else 4)
    # give every direction its own parameters, so a mix-up between directions shows
    with torch.no_grad():
        for direction in mixer.directions:
            direction.dt_bias.normal_(0, 0.5)
            direction.A_log.uniform_(-1, 1)
            direction.D.normal_()
            direction.conv1d.weight.normal_(0, 0.5)
            direction.conv1d.bias.normal_(0, 0.1)
        mixer.norm.weight.normal_(1, 0.2)
    grid = config.patch_grid
    h = torch.randn(2, grid * grid, config.connector_hidden_size)
    expected = slow_scan_mixer(mixer, h, reference_scan_orders(scan_type, grid))
    with torch.no_grad():
        got = mixer(h)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)


def test_csm_orders_are_distinct_and_cover_the_grid():
    torch.manual_seed(0)
    config = tiny_config(scan_type="csm")
    mixer = MLMambaForConditionalGeneration(config).model.connector.msc.layers[0].mixer
    h = torch.randn(1, config.num_image_tokens, config.connector_hidden_size)
    # CSM with one direction's conv mirrored onto another must differ from BSM: the column orders are really used
    expected_csm = slow_scan_mixer(mixer, h, reference_scan_orders("csm", config.patch_grid))
    wrong_orders = reference_scan_orders("bsm", config.patch_grid) * 2
    wrong = slow_scan_mixer(mixer, h, wrong_orders)
    with torch.no_grad():
        got = mixer(h).double()
    torch.testing.assert_close(got, expected_csm, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, wrong, atol=1e-4)


@pytest.mark.parametrize("connector_type", ["msc", "msc_basic", "mlp"])
def test_connector_variants_have_the_papers_structure(connector_type):
    model = tiny_model(connector_type=connector_type)
    connector = model.model.connector
    if connector_type == "mlp":
        assert connector.msc is None
    else:
        layers = connector.msc.layers
        assert len(layers) == 2
        assert all(hasattr(layer, "mlp") == (connector_type == "msc") for layer in layers)
    ids = image_prompt_ids(model.config, [3, 4])
    assert model(input_ids=ids, pixel_values=torch.randn(1, 6, 32, 32)).logits.shape == (1, ids.shape[1], 128)


# ---------------------------------------------------------------------------------------------------------------
# Shapes of the release
# ---------------------------------------------------------------------------------------------------------------
def test_released_config_has_the_released_parameter_count():
    config = MLMambaConfig()
    assert config.num_image_tokens == 729 and config.vision_feature_size == 2176
    with torch.device("meta"):
        model = MLMambaForConditionalGeneration(config)

    def count(module):
        return sum(p.numel() for p in module.parameters())  # parameters() yields tied tensors once

    connector = model.model.connector
    assert round(count(model.model.language_model) / 1e9, 3) == 2.703
    assert round(count(connector.msc) / 1e6, 1) == 119.8
    assert round(count(connector.projector) / 1e6, 1) == 59.0
    assert round(count(connector.pre_connector) / 1e6, 1) == 5.6
    without_towers = count(model) - count(model.model.vision_towers)
    assert round(without_towers / 1e9, 3) == 2.887
    # exact shapes of SPEC §4
    mixer = connector.msc.layers[0].mixer
    assert tuple(mixer.in_proj.weight.shape) == (10576, 2560)
    assert tuple(mixer.directions[1].conv1d.weight.shape) == (5376, 1, 4)
    assert tuple(mixer.directions[1].A_log.shape) == (80,)
    assert tuple(model.model.language_model.embeddings.weight.shape) == (50288, 2560)
    assert model.lm_head.weight is model.model.language_model.embeddings.weight
    # towers end at the second-to-last block: 23 of 24 DINOv2 blocks, 26 of 27 SigLIP blocks
    dino, siglip = model.model.vision_towers
    assert len(dino.encoder.layer) == 23 and len(siglip.encoder.layers) == 26
    assert not any("layernorm" in n for n, _ in dino.named_parameters() if n.startswith("layernorm"))


def test_vision_features_come_from_the_second_to_last_block_without_prefix_tokens():
    """The towers we build end at the feature layer; compare with the full transformers towers' hidden_states[-2]."""
    from transformers import AutoModel

    model = tiny_model(seed=5)
    config = model.config
    pixel_values = torch.randn(2, 6, 32, 32)
    expected = []
    for i, (tower_config, tower) in enumerate(zip(config.vision_config, model.model.vision_towers)):
        full = AutoModel.from_config(tower_config).eval()
        missing, _ = full.load_state_dict(tower.state_dict(), strict=False)
        assert all(".layer.2." in k or ".layers.2." in k or "layernorm" in k or "head" in k for k in missing), missing
        with torch.no_grad():
            hidden = full(pixel_values=pixel_values[:, 3 * i:3 * i + 3], output_hidden_states=True).hidden_states[-2]
        expected.append(hidden[:, -config.num_image_tokens:])
    with torch.no_grad():
        got = model.model.connector(torch.cat(expected, -1))
        features = model.get_image_features(pixel_values)
    torch.testing.assert_close(features, got)


# ---------------------------------------------------------------------------------------------------------------
# Inputs: several images, text-only samples, logits_to_keep, labels, bad input
# ---------------------------------------------------------------------------------------------------------------
def test_several_images_per_sample_and_text_only_samples_in_one_batch():
    model = tiny_model(seed=6)
    config = model.config
    n = config.num_image_tokens
    img = config.image_token_id
    two_images = [img] * n + [7, 8] + [img] * n + [9]
    text_only = [10, 11, 12] + [13] * (len(two_images) - 3)
    pixel_values = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        batch = model(input_ids=torch.tensor([two_images, text_only]), pixel_values=pixel_values).logits
        alone_images = model(input_ids=torch.tensor([two_images]), pixel_values=pixel_values).logits
        alone_text = model(input_ids=torch.tensor([text_only])).logits
        # the second image really lands in the second run of placeholders
        swapped = model(input_ids=torch.tensor([two_images]), pixel_values=pixel_values.flip(0)).logits
    torch.testing.assert_close(batch[0], alone_images[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1], alone_text[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(swapped[0, -1], alone_images[0, -1])


def test_logits_to_keep_and_labels():
    model = tiny_model(seed=7)
    ids = image_prompt_ids(model.config, [5, 6, 7, 8])
    pv = torch.randn(1, 6, 32, 32)
    labels = ids.clone()
    labels[ids == model.config.image_token_id] = -100
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pv, labels=labels)
        last = model(input_ids=ids, pixel_values=pv, logits_to_keep=1)
    torch.testing.assert_close(last.logits[:, -1], full.logits[:, -1])
    assert last.logits.shape[1] == 1
    # the loss by hand: predict token t+1 from position t, only where the label is not -100
    shift_logits, shift_labels = full.logits[0, :-1], labels[0, 1:]
    keep = shift_labels != -100
    expected = F.cross_entropy(shift_logits[keep], shift_labels[keep])
    torch.testing.assert_close(full.loss, expected)


def test_bad_inputs_fail_with_clear_errors():
    model = tiny_model()
    config = model.config
    ids = image_prompt_ids(config, [5, 6])
    with pytest.raises(ValueError, match=r"tokens: 16, features: 32"):
        model(input_ids=ids, pixel_values=torch.randn(2, 6, 32, 32))
    with pytest.raises(ValueError, match=r"\[num_images, 6, 32, 32\].*got \[1, 3, 32, 32\]"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"got \[1, 6, 64, 64\]"):
        model(input_ids=ids, pixel_values=torch.randn(1, 6, 64, 64))
    with pytest.raises(ValueError, match="16 image tokens.*no pixel_values"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"Unknown connector_type 'transformer'.*'mlp', 'msc_basic', 'msc'"):
        tiny_config(connector_type="transformer")
    with pytest.raises(ValueError, match=r"Unknown scan_type 'zigzag'.*'bsm', 'csm'"):
        tiny_config(scan_type="zigzag")
    with pytest.raises(ValueError, match=r"Unsupported text_config type 'llama'.*\['mamba2', 'mamba'\]"):
        tiny_config(text_config={"model_type": "llama", "hidden_size": 32})
    with pytest.raises(ValueError, match=r"Unsupported vision_config\[0\] type 'vit'"):
        tiny_config(vision_config=[{"model_type": "vit"}])


# ---------------------------------------------------------------------------------------------------------------
# Configuration, saving, loading
# ---------------------------------------------------------------------------------------------------------------
def test_config_round_trips_exactly(tmp_path):
    config = tiny_config(scan_type="csm", connector_num_layers=3)
    again = MLMambaConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = MLMambaConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vision_config"][0]["model_type"] == "dinov2_with_registers"
    assert saved["auto_map"]["AutoModel"] == "modeling_mlmamba.MLMambaForConditionalGeneration"
    assert saved["auto_map"]["AutoModelForImageTextToText"] == "modeling_mlmamba.MLMambaForConditionalGeneration"


def test_cobra_style_config_with_a_mamba1_lm_generates():
    text = dict(model_type="mamba", vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                conv_kernel=4, tie_word_embeddings=True, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    model = tiny_model(text_config=text, connector_type="mlp", use_pre_connector=False)
    assert model.model.connector.projector[0].in_features == 56  # 32 + 24 tower channels, no pre-connector
    ids = image_prompt_ids(model.config, [3, 4, 5])
    pv = torch.randn(1, 6, 32, 32)
    expected, _ = greedy_by_full_recompute(model, ids, pv, 6)
    got = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(got[:, ids.shape[1]:], expected)


def test_save_then_offline_auto_load_with_remote_code_gives_identical_logits(tmp_path):
    model = tiny_model(seed=8)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    files = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in files and "modeling_mlmamba.py" in files and "configuration_mlmamba.py" in files
    ids = image_prompt_ids(model.config, [5, 6, 7])
    pv = torch.randn(1, 6, 32, 32)
    torch.save({"ids": ids, "pv": pv}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pv).logits
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM
        def package_imported():
            return any(m == "modeling_mlmamba" or m.startswith("modeling_mlmamba.") for m in sys.modules)
        assert not package_imported()
        inputs = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        out = {{}}
        for auto in (AutoModelForImageTextToText, AutoModel, AutoModelForCausalLM):
            model = auto.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            assert type(model).__name__ == "MLMambaForConditionalGeneration"
            assert model.lm_head.weight.data_ptr() == model.model.language_model.embeddings.weight.data_ptr()
            with torch.no_grad():
                out[auto.__name__] = model(input_ids=inputs["ids"], pixel_values=inputs["pv"]).logits
        assert not package_imported()  # the folder's own code was used, not the installed package
        torch.save(out, {str(tmp_path / "out.pt")!r})
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, logits in torch.load(tmp_path / "out.pt", weights_only=True).items():
        assert torch.equal(logits, expected), name


def test_installed_package_registers_the_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    model = tiny_model(seed=9)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MLMambaConfig)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded) is MLMambaForConditionalGeneration
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_bfloat16_dtype_and_sharded_save(tmp_path):
    model = tiny_model(seed=10)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = MLMambaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.lm_head.weight is loaded.model.language_model.embeddings.weight
    ids = image_prompt_ids(model.config, [5, 6, 7])
    out = loaded.generate(input_ids=ids, pixel_values=torch.randn(1, 6, 32, 32), max_new_tokens=4, do_sample=False,
                          eos_token_id=None)
    assert out.shape[1] == ids.shape[1] + 4


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_training_steps_lower_the_loss_and_reach_connector_and_lm_only(gradient_checkpointing):
    model = tiny_model(seed=11).train()
    model.model.vision_towers.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ids = torch.cat([image_prompt_ids(model.config, [5, 6, 7, 8, 9, 10]) for _ in range(2)])
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)
    pv = torch.randn(2, 6, 32, 32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(8):
        loss = model(input_ids=ids, pixel_values=pv, labels=labels).loss
        loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in model.named_parameters()}
            assert all(g is None for n, g in grads.items() if ".vision_towers." in n)
            for part in ("connector.pre_connector", "connector.msc.layers.0.mixer.in_proj", "connector.msc.layers.0.mlp",
                         "connector.projector", "language_model.layers.0.mixer.in_proj", "language_model.embeddings"):
                reached = [g for n, g in grads.items() if part in n and g is not None]
                assert reached and any(g.abs().sum() > 0 for g in reached), part
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # tied embeddings stay tied through training
    assert model.lm_head.weight is model.model.language_model.embeddings.weight


def test_static_state_cache_decodes_like_the_dynamic_cache_and_is_reusable():
    """The fast path's preallocated state cache (allocated once per batch size, reset between calls), here on CPU
    where no graph is captured: same tokens as transformers' default DynamicCache, call after call."""
    from modeling_mlmamba.generation_mlmamba import DecodeGraphRunner
    from modeling_mlmamba.modeling_mlmamba import MLMambaCausalLMOutput

    model = tiny_model(seed=12)
    ids = torch.cat([image_prompt_ids(model.config, [5, 6, 7, 8]), image_prompt_ids(model.config, [9, 10, 11, 12])])
    pv = torch.randn(2, 6, 32, 32)
    kwargs = dict(input_ids=ids, pixel_values=pv, max_new_tokens=16, do_sample=False, eos_token_id=None)
    reference = model.generate(**kwargs)
    assert torch.equal(model.generate(**kwargs, cache_implementation="static"), reference)
    runner = DecodeGraphRunner(model, MLMambaCausalLMOutput)
    cache = runner.cache_for(2)
    assert torch.equal(model.generate(**kwargs, cache_params=cache), reference)
    again = runner.cache_for(2)  # reset in place, same tensors (the addresses a captured graph replays against)
    assert again is cache and not cache.layers[0].has_previous_state[0]
    assert torch.equal(model.generate(**kwargs, cache_params=again), reference)
