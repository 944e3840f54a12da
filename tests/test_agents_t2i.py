"""Text-to-image agents (sd, pixart) on tiny random models: scores recomputed by hand from the denoiser's own
attention inputs, the capture leaves the forward pass unchanged, and scores depend on the class set."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from extract.agents import get_agent
from extract.agents.base import LoadRequest, Source
from extract.families import ExtractContext
from extract.families import t2i
from pipelines.presets import student_spec

STUDENT = student_spec("tiny")
CLASSNAMES = ["Annual Crop Land", "Forest", "Highway or Road", "River", "Sea or Lake"]
TEMPLATE = "a centered satellite photo of {}."
SIZES = [(40, 28), (25, 36), (32, 32)]  # non-square images exercise the view-0 centre crop


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        (root / f"c{i}").mkdir()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"c{i}" / "img.png")
    return root


def context(image_root, classnames=CLASSNAMES, class_set="all", template=TEMPLATE):
    keys = sorted(f"c{i}/img.png" for i in range(len(SIZES)))
    return ExtractContext(dataset="toy", image_root=image_root, keys=keys, classnames=list(classnames),
                          template=template, student=STUDENT, class_set=class_set)


def load_tiny(name, seed=0):
    runtime = get_agent(name).load(LoadRequest(tiny=True, student=STUDENT, seed=seed))
    # Random init gives near-uniform attention, where a missing 1/sqrt(d) would hardly show: sharpen the keys.
    with torch.no_grad():
        for layer in runtime.captured_layers:
            runtime.denoiser.get_submodule(layer).to_k.weight.mul_(40.0)
    return runtime


@pytest.fixture(scope="module", params=["sd", "pixart"])
def agent(request):
    return request.param, load_tiny(request.param)


# ----------------------------------------------------------------------------------------------------------------
# The reference: the pipeline written out by hand, the denoiser run with diffusers' own attention processor.

def reference_pixels(image_root, keys, size):
    """View 0 = the centre square resampled bicubic to size x size (a PIL box resize, as in cache_schema), in
    [-1, 1]."""
    batch = []
    for key in keys:
        image = Image.open(image_root / key).convert("RGB")
        side = min(image.size)
        x0, y0 = (image.width - side) // 2, (image.height - side) // 2
        square = image.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
        batch.append(np.asarray(square, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(batch))


def reference_class_tokens(name, runtime, prompts):
    tokenizer, encoder = runtime.tokenizer, runtime.text_encoder
    if name == "sd":  # CLIP: last_hidden_state at the EOT token
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        hidden = encoder(input_ids=ids).last_hidden_state
        eot = torch.tensor([row.tolist().index(tokenizer.eos_token_id) for row in ids])
        vectors = hidden[torch.arange(len(prompts)), eot]
    else:  # T5: mean over the real tokens
        vectors = []
        for prompt in prompts:  # one at a time: no padding at all
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            vectors.append(encoder(input_ids=ids).last_hidden_state[0].mean(dim=0))
        vectors = torch.stack(vectors)
    return torch.nn.functional.normalize(vectors, dim=-1)


def run_denoiser(name, runtime, latents, tokens):
    batch = latents.shape[0]
    context = tokens.unsqueeze(0).expand(batch, -1, -1)
    t = torch.ones(batch, dtype=torch.long)
    if name == "sd":
        return runtime.denoiser(latents, t, encoder_hidden_states=context).sample
    return runtime.denoiser(latents, encoder_hidden_states=context, timestep=t,
                            encoder_attention_mask=torch.ones(batch, tokens.shape[0]),
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def hooked_attention_inputs(runtime):
    """Forward pre-hooks on the captured cross-attention modules: layer -> (query input, context input)."""
    seen, handles = {}, []
    for layer in runtime.captured_layers:
        def hook(module, args, kwargs, layer=layer):
            seen[layer] = (kwargs.get("hidden_states", args[0] if args else None), kwargs["encoder_hidden_states"])
        handles.append(runtime.denoiser.get_submodule(layer).register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def hand_scores(runtime, seen, scaled=True):
    """softmax(q k^T / sqrt(d)) over the class tokens, mean over heads, mean per resolution, logsumexp over space.
    `scaled=False` is the official PixArt extractor's softmax(q k^T)."""
    groups = {}
    for layer, (hidden, context) in seen.items():
        attn = runtime.denoiser.get_submodule(layer)
        q, k = attn.to_q(hidden), attn.to_k(context)
        batch, positions, inner = q.shape
        d = inner // attn.heads
        q = q.view(batch, positions, attn.heads, d).transpose(1, 2)
        k = k.view(batch, -1, attn.heads, d).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / (math.sqrt(d) if scaled else 1.0)
        probs = torch.softmax(logits, dim=-1).mean(dim=1)
        groups.setdefault(positions, []).append(probs)
    return torch.stack([torch.logsumexp(torch.stack(groups[hw]).mean(0), dim=1) for hw in sorted(groups)], dim=1)


# ----------------------------------------------------------------------------------------------------------------

def test_compute_equals_hand_recomputation_from_the_live_model(agent, image_root):
    name, runtime = agent
    ctx = context(image_root)
    rows = t2i.rows(ctx)
    assert rows == [(key, 0) for key in ctx.keys]
    scores = t2i.compute(runtime, rows, ctx)["scores"]
    spec = t2i.arrays(runtime, ctx)["scores"]
    assert scores.shape == (len(rows), *spec.row_shape) and scores.dtype == np.float32 == spec.numpy_dtype
    assert spec.row_shape == ({"sd": 2, "pixart": 1}[name], len(CLASSNAMES))

    from diffusers.models.attention_processor import AttnProcessor

    saved = dict(runtime.denoiser.attn_processors)
    seen, handles = hooked_attention_inputs(runtime)
    try:
        runtime.denoiser.set_attn_processor(AttnProcessor())  # diffusers' own attention, nothing of ours
        with torch.no_grad():
            pixels = reference_pixels(image_root, ctx.keys, runtime.image_size)
            assert pixels.min() >= -1.0 and pixels.max() <= 1.0
            latents = runtime.vae.encode(pixels).latent_dist.mode() * runtime.vae.config.scaling_factor
            tokens = reference_class_tokens(name, runtime, [TEMPLATE.format(c) for c in CLASSNAMES])
            run_denoiser(name, runtime, latents, tokens)
            expected = hand_scores(runtime, seen)
            unscaled = hand_scores(runtime, seen, scaled=False)
    finally:
        for handle in handles:
            handle.remove()
        runtime.denoiser.set_attn_processor(saved)
    assert all(context.shape[1] == len(CLASSNAMES) for _, context in seen.values())  # C context tokens
    np.testing.assert_allclose(scores, expected.numpy(), rtol=0, atol=1e-4)
    assert np.abs(scores - unscaled.numpy()).max() > 1e-2  # the test can tell a missing 1/sqrt(d)


def test_vae_input_is_view_0_in_minus_one_to_one(image_root):
    """The official code mapped [-1, 1] images through 2x - 1 again, to [-3, 1]; ours feed the VAE [-1, 1]."""
    ctx = context(image_root)
    pixels = t2i.view0_pixels(ctx, ctx.keys, 24)
    torch.testing.assert_close(pixels, reference_pixels(image_root, ctx.keys, 24), rtol=0, atol=1e-6)
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.min() < -0.9 and pixels.max() > 0.9


def test_capture_leaves_the_denoiser_output_unchanged(agent, image_root):
    name, runtime = agent
    from diffusers.models.attention_processor import AttnProcessor2_0

    side = runtime.image_size // 2  # the tiny VAE downsamples by 2
    latents = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(1))
    tokens = runtime.class_tokens([TEMPLATE.format(c) for c in CLASSNAMES[:3]])
    saved = dict(runtime.denoiser.attn_processors)
    with torch.no_grad():
        captured = run_denoiser(name, runtime, latents, tokens)
        runtime.denoiser.set_attn_processor(AttnProcessor2_0())
        plain = run_denoiser(name, runtime, latents, tokens)
    runtime.denoiser.set_attn_processor(saved)
    runtime.store.clear()
    torch.testing.assert_close(captured, plain, rtol=1e-4, atol=1e-5)


def test_only_chosen_cross_attention_layers_are_captured(agent):
    name, runtime = agent
    processors = runtime.denoiser.attn_processors
    capturing = sorted(n[: -len(".processor")] for n, p in processors.items()
                       if isinstance(p, t2i.CrossAttentionCapture))
    assert capturing == sorted(runtime.captured_layers)
    assert all(layer.endswith(".attn2") for layer in capturing)  # never self-attention
    if name == "sd":
        assert not any(layer.startswith("mid_block") for layer in capturing)  # official: up + down only
        assert any(n.startswith("mid_block") and n.endswith("attn2.processor") for n in processors)
        assert len(capturing) == 6  # tiny: 1 per down block, 2 per up block (layers_per_block + 1)


def test_scores_depend_on_the_class_set(agent, image_root):
    """Softmax over the class tokens: the base classes score differently when the novel ones are present."""
    name, runtime = agent
    full = context(image_root)
    base = context(image_root, CLASSNAMES[:3], class_set="base")
    all_scores = t2i.compute(runtime, t2i.rows(full), full)["scores"]
    base_scores = t2i.compute(runtime, t2i.rows(base), base)["scores"]
    assert base_scores.shape[-1] == 3
    assert not np.allclose(all_scores[..., :3], base_scores, atol=1e-3)
    assert t2i.fingerprint_fields(full) != t2i.fingerprint_fields(base)


def test_fingerprint_names_class_set_classnames_and_template(image_root):
    ctx = context(image_root)
    fields = t2i.fingerprint_fields(ctx)
    assert fields["classnames"] == CLASSNAMES and fields["class_set"] == "all" and fields["template"] == TEMPLATE
    assert fields["conditioning"] == "template"   # which text the class vectors were made of
    assert t2i.fingerprint_fields(context(image_root, class_set="base")) != fields
    assert t2i.fingerprint_fields(context(image_root, template="a photo of a {}.")) != fields
    assert t2i.fingerprint_fields(context(image_root, CLASSNAMES[::-1])) != fields
    for name in ("sd", "pixart"):  # the resolution is in the agent part of the fingerprint
        assert get_agent(name).fingerprint_fields(tiny=True)["tiny_config"]["image_size"] == 32
        assert get_agent(name).fingerprint_fields(tiny=False)["preprocessing"]["image_size"] == 512


def test_tiny_agents_are_deterministic(image_root):
    ctx = context(image_root, CLASSNAMES[:2])
    first = t2i.compute(get_agent("pixart").load(LoadRequest(tiny=True, student=STUDENT, seed=3)), t2i.rows(ctx), ctx)
    again = t2i.compute(get_agent("pixart").load(LoadRequest(tiny=True, student=STUDENT, seed=3)), t2i.rows(ctx), ctx)
    np.testing.assert_array_equal(first["scores"], again["scores"])


def test_float16_run_matches_float32(image_root):
    """The GPU precision on CPU (PixArt: denoiser in float16, T5 in bfloat16) agrees with float32."""
    ctx = context(image_root, CLASSNAMES[:3])
    full = t2i.compute(get_agent("pixart").load(LoadRequest(tiny=True, student=STUDENT)), t2i.rows(ctx), ctx)
    half = t2i.compute(get_agent("pixart").load(LoadRequest(tiny=True, student=STUDENT, dtype="float16")),
                       t2i.rows(ctx), ctx)
    assert half["scores"].dtype == np.float32
    np.testing.assert_allclose(half["scores"], full["scores"], rtol=0, atol=5e-4)


def test_real_geometry_gives_the_reference_resolutions():
    """SD v1.4 at 512 px: cross-attention at 64², 32², 16² latent positions (3 groups); PixArt-XL-2-512: 32²."""
    from extract.agents.sd import unet_attention_sizes

    unet = SimpleNamespace(config=SimpleNamespace(
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 512, 512]))
    assert unet_attention_sizes(unet, vae, 512, ("down_blocks", "up_blocks")) == (16**2, 32**2, 64**2)


def test_bad_template_and_views_are_refused(agent, image_root):
    _, runtime = agent
    with pytest.raises(ValueError, match="must contain"):
        t2i.compute(runtime, [("c0/img.png", 0)], context(image_root, template="a photo"))
    with pytest.raises(ValueError, match="view 0"):
        t2i.compute(runtime, [("c0/img.png", 1)], context(image_root))


def test_hub_failure_names_the_offline_routes(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    request = LoadRequest(tiny=False, student=STUDENT, source=Source(hub_id="CompVis/stable-diffusion-v1-4"))
    with pytest.raises(OSError, match="(?s)'sd'.*HF_HUB_OFFLINE=1"):
        get_agent("sd").load(request)
    request = LoadRequest(tiny=False, student=STUDENT, source=Source(local_path=str(tmp_path)))  # no model in it
    with pytest.raises(OSError, match="(?s)'pixart'.*Offline routes"):
        get_agent("pixart").load(request)


def test_resolved_commit_is_read_from_the_hub_cache(monkeypatch, tmp_path):
    """The manifest records the commit a hub id resolved to; it is read from the Hugging Face cache layout."""
    import huggingface_hub.constants

    from extract.hub import hub_commit

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--CompVis--stable-diffusion-v1-4"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub_commit(Source(hub_id="CompVis/stable-diffusion-v1-4"), "model_index.json") == commit
    assert hub_commit(Source(hub_id="CompVis/stable-diffusion-v1-4", revision=commit), "model_index.json") == commit
    assert hub_commit(Source(hub_id="PixArt-alpha/PixArt-XL-2-512x512"), "model_index.json") is None
    assert hub_commit(Source(local_path=str(tmp_path)), "model_index.json") is None


DESCRIPTIONS = {  # as a Vicuna descriptions file spells its keys (case and '_' differ from the class names)
    "annual crop land": ["Rows of green crops.", "A patchwork of fields seen from above.", "Farmland."],
    "FOREST": ["Dense trees.", "A dark green canopy."],
    "highway_or_road": ["A grey line through the land."],
    "River": ["A winding band of water.", "Water between banks."],
    "Sea or Lake": ["A wide blue surface."],
}


def test_sd_is_conditioned_on_the_mean_eot_feature_of_the_vicuna_descriptions(agent, image_root, tmp_path):
    """Official LLM_TEMPLATE: True: class vector = normalise(mean over the class's descriptions of the EOT
    feature); PixArt keeps the template."""
    name, runtime = agent
    descriptions = tmp_path / "vicuna.json"
    descriptions.write_text(json.dumps(DESCRIPTIONS))
    ctx = context(image_root)
    ctx.options = {"conditioning": "vicuna", "descriptions": str(descriptions)}
    if name == "pixart":
        with pytest.raises(ValueError, match="conditions on \\['template'\\], not 'vicuna'"):
            t2i.compute(runtime, t2i.rows(ctx), ctx)
        return
    texts = list(DESCRIPTIONS.values())
    with torch.no_grad():
        means = []
        for group in texts:   # the EOT features of a class's descriptions, averaged before normalising
            ids = runtime.tokenizer(group, padding="max_length", max_length=77, truncation=True,
                                    return_tensors="pt").input_ids
            hidden = runtime.text_encoder(input_ids=ids).last_hidden_state
            eot = torch.tensor([row.tolist().index(runtime.tokenizer.eos_token_id) for row in ids])
            means.append(hidden[torch.arange(len(group)), eot].mean(dim=0))
        expected = torch.nn.functional.normalize(torch.stack(means), dim=-1)
        single = reference_class_tokens("sd", runtime, [group[0] for group in texts])
    tokens = runtime.class_tokens(t2i.class_texts(runtime, ctx))
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(tokens[0], single[0], atol=1e-3)   # a mean over 3 descriptions, not the first one
    template = runtime.class_tokens(t2i.class_texts(runtime, context(image_root)))
    assert not torch.allclose(tokens, template, atol=1e-3)
    scores = t2i.compute(runtime, t2i.rows(ctx)[:1], ctx)["scores"]   # compute feeds these class vectors
    pixels = t2i.view0_pixels(ctx, ctx.keys[:1], runtime.image_size)
    np.testing.assert_allclose(scores, runtime.scores(pixels, expected).numpy(), rtol=0, atol=1e-5)

    fields = t2i.fingerprint_fields(ctx)   # the descriptions by content; the template plays no part
    assert fields["conditioning"] == "vicuna" and "template" not in fields and len(fields["descriptions_sha256"]) == 64
    ctx.template = "a photo of a {}."
    assert t2i.fingerprint_fields(ctx) == fields
    descriptions.write_text(json.dumps({**DESCRIPTIONS, "River": ["A river."]}))
    assert t2i.fingerprint_fields(ctx) != fields
    chained = dict(ctx.options, vicuna_cache="0123456789abcdef", descriptions=str(tmp_path / "missing.json"))
    ctx.options = chained   # vicuna's generated descriptions: its fingerprint is chained, the file read at run time
    assert t2i.fingerprint_fields(ctx)["vicuna_cache"] == "0123456789abcdef"
    with pytest.raises(FileNotFoundError, match="extract vicuna first"):
        t2i.compute(runtime, t2i.rows(ctx), ctx)
    for bad in ({"conditioning": "vicuna"}, {"conditioning": "t5"}, {"descriptions": str(descriptions)},
                {"template": "coop"}):
        ctx.options = bad
        with pytest.raises(ValueError, match="t2i"):
            t2i.fingerprint_fields(ctx)


@pytest.mark.slow
def test_sd_real_size_unet_random_weights(image_root):
    """The SD v1.4 UNet/VAE architecture (random weights) at 512 px: three score rows per image."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from extract.agents.sd import StableDiffusion, tiny_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    runtime = StableDiffusion(
        unet=UNet2DConditionModel(cross_attention_dim=768, sample_size=64),
        vae=AutoencoderKL(block_out_channels=(128, 256, 512, 512),
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=12, vocab_size=len(tokenizer))),
        tokenizer=tokenizer, image_size=512, device="cpu")
    assert runtime.resolutions == (256, 1024, 4096)
    ctx = context(image_root, CLASSNAMES[:3])
    scores = t2i.compute(runtime, t2i.rows(ctx)[:1], ctx)["scores"]
    assert scores.shape == (1, 3, 3) and np.isfinite(scores).all()
