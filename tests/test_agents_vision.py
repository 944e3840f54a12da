"""Vision agents (dino, mae, sam, vitdet): tiny configs run offline, and a cached row equals the agent run live on
the same view pixels, normalised with ImageNet statistics written out here (SAM's 0-255 statistics on a 0-255 image
are the same numbers)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cache_schema.quantize import dequantize_int8, quantize_int8
from cache_schema.student import StudentGrid
from cache_schema.views import ViewSpec, apply_view, view_params
from extract.agents import LoadRequest, Source, get_agent
from extract.families import ExtractContext, vision
from pipelines.presets import student_spec

AGENTS = ("dino", "mae", "sam", "vitdet")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
STUDENT = student_spec("tiny")
GRID = STUDENT.grid  # 4


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three synthetic images of different sizes and aspect ratios: gradients plus noise, so crops differ."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    keys = []
    for index, (width, height) in enumerate([(40, 30), (64, 64), (50, 70)]):
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
        pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        key = f"class_{index}/image_{index}.png"
        (root / key).parent.mkdir()
        Image.fromarray(pixels).save(root / key)
        keys.append(key)
    return root, keys


@pytest.fixture(scope="module")
def runtimes():
    return {name: get_agent(name).load(LoadRequest(tiny=True, student=STUDENT, seed=0)) for name in AGENTS}


def context(images, **overrides):
    root, keys = images
    fields = dict(dataset="synthetic", image_root=root, keys=keys, classnames=["a", "b", "c"],
                  template="a photo of a {}.", student=STUDENT, views=2)
    return ExtractContext(**{**fields, **overrides})


def live_tokens(runtime, ctx, key, view_id):
    """What stage 2 would compute without a cache: the agent on the view's pixels -> unit tokens [L, T, D]."""
    image = Image.open(ctx.image_path(key))
    params = view_params(key, view_id, image.width, image.height, ctx.view_spec)
    pixels = torch.from_numpy(np.asarray(apply_view(image, params, STUDENT.image_size), dtype=np.float32) / 255)
    pixels = (pixels.permute(2, 0, 1) - IMAGENET_MEAN) / IMAGENET_STD
    return F.normalize(runtime.encode(pixels[None])[0], dim=-1).cpu().numpy(), params


@pytest.mark.parametrize("name", AGENTS)
def test_cached_rows_equal_the_live_agent(name, images, runtimes):
    runtime, ctx = runtimes[name], context(images)
    rows = vision.rows(ctx)
    assert rows == [(key, view) for key in ctx.keys for view in (0, 1)]
    out = vision.compute(runtime, rows, ctx)
    specs = vision.arrays(runtime, ctx)
    assert set(out) == set(specs) == {"tokens", "token_mean", "views"}
    for array_name, spec in specs.items():
        assert out[array_name].shape == (len(rows), *spec.row_shape) and out[array_name].dtype == spec.numpy_dtype
    assert specs["tokens"].row_shape == (runtime.num_layers, GRID * GRID, runtime.dim)
    for row, (key, view_id) in enumerate(rows):
        live, params = live_tokens(runtime, ctx, key, view_id)
        np.testing.assert_allclose(out["tokens"][row].astype(np.float32), live, atol=2e-3, rtol=0)
        np.testing.assert_allclose(out["token_mean"][row], live.mean(axis=1), atol=1e-5)
        np.testing.assert_array_equal(out["views"][row], params)
    norms = np.linalg.norm(out["tokens"].astype(np.float32), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    assert not np.array_equal(out["tokens"][0], out["tokens"][1])  # view 1 is a different crop


def test_layers_are_selected_not_recomputed(images, runtimes):
    ctx = context(images, views=1)
    rows = vision.rows(ctx)
    full = vision.compute(runtimes["dino"], rows, ctx)
    some = vision.compute(runtimes["dino"], rows, context(images, views=1, layers=(2, 0)))
    np.testing.assert_array_equal(some["tokens"], full["tokens"][:, [2, 0]])
    np.testing.assert_array_equal(some["token_mean"], full["token_mean"][:, [2, 0]])
    for bad in [(3,), (-1,), (1, 1)]:
        with pytest.raises(ValueError, match="layers"):
            vision.arrays(runtimes["dino"], context(images, layers=bad))


def test_token_pool_averages_2x2_and_renormalises(images, runtimes):
    rows = [(images[1][0], 1), (images[1][2], 0)]
    full = vision.compute(runtimes["sam"], rows, context(images, dtype="float32"))
    pooled = vision.compute(runtimes["sam"], rows, context(images, dtype="float32", token_pool=2))
    layers, dim = full["tokens"].shape[1], full["tokens"].shape[-1]
    grid = full["tokens"].reshape(len(rows), layers, 2, 2, 2, 2, dim)     # rows, L, y-block, y, x-block, x, D
    expected = grid.mean(axis=(3, 5)).reshape(len(rows), layers, 4, dim)
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(pooled["tokens"], expected, atol=1e-5)
    np.testing.assert_allclose(pooled["token_mean"], pooled["tokens"].mean(axis=2), atol=1e-6)
    assert vision.arrays(runtimes["sam"], context(images, token_pool=2))["tokens"].row_shape == (layers, 4, dim)
    with pytest.raises(ValueError, match="token_pool"):
        vision.arrays(runtimes["sam"], context(images, token_pool=3))


def test_int8_round_trip(images, runtimes):
    rows = vision.rows(context(images))
    exact = vision.compute(runtimes["vitdet"], rows, context(images, dtype="float32"))
    quantised = vision.compute(runtimes["vitdet"], rows, context(images, dtype="int8"))
    specs = vision.arrays(runtimes["vitdet"], context(images, dtype="int8"))
    assert quantised["tokens"].dtype == np.int8 and specs["tokens"].dtype == "int8"
    assert quantised["tokens_scale"].shape == (len(rows), *specs["tokens_scale"].row_shape)
    restored = dequantize_int8(quantised["tokens"], quantised["tokens_scale"])
    peak = np.abs(exact["tokens"]).max(axis=-1, keepdims=True)
    assert (np.abs(restored - exact["tokens"]) <= peak / 127 * 0.5 + 1e-7).all()
    assert np.abs(quantised["tokens"]).max() == 127
    np.testing.assert_array_equal(quantised["token_mean"], exact["token_mean"])  # means come from float tokens


def test_an_all_zero_token_has_one_scale_in_both_stages(images, runtimes, monkeypatch):
    """Stage 1 writes what the shared codec computes; before, it stored scale 1 for an all-zero token where the
    codec stage 2 imports said 0."""
    runtime = runtimes["vitdet"]
    encode = runtime.encode

    def one_token_zero(pixels):
        tokens = encode(pixels)
        tokens[:, :, 0] = 0
        return tokens

    monkeypatch.setattr(runtime, "encode", one_token_zero)
    written = vision.compute(runtime, vision.rows(context(images)), context(images, dtype="int8"))
    _, codec_scale = quantize_int8(np.zeros((1, written["tokens"].shape[-1]), np.float32))
    assert codec_scale[0] == 1 and (written["tokens_scale"][:, :, 0] == codec_scale[0]).all()
    assert not written["tokens"][:, :, 0].any()
    assert not dequantize_int8(written["tokens"], written["tokens_scale"])[:, :, 0].any()


def test_mae_is_unmasked_and_deterministic(images, runtimes):
    ctx = context(images)
    rows = vision.rows(ctx)
    torch.manual_seed(1)
    first = vision.compute(runtimes["mae"], rows, ctx)
    torch.manual_seed(2)
    second = vision.compute(runtimes["mae"], rows, ctx)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    model = runtimes["mae"].model
    out = model(pixel_values=torch.zeros(1, 3, 32, 32), noise=torch.arange(16.0)[None])
    assert model.config.mask_ratio == 0.0 and out.mask.sum() == 0
    assert torch.equal(out.ids_restore[0], torch.arange(16))


def test_sam_position_tables_are_resized_to_the_student_grid(runtimes):
    from transformers import SamVisionConfig
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    from extract.agents import sam

    torch.manual_seed(0)
    native = SamVisionEncoder(SamVisionConfig(**sam.TINY_CONFIG))  # 64 px: 8 x 8 grid, global block 2
    resized = sam.at_image_size(native, STUDENT.image_size)
    assert resized.pos_embed.shape == (1, GRID, GRID, 64)
    expected_pos = F.interpolate(native.pos_embed.permute(0, 3, 1, 2), size=(GRID, GRID), mode="bicubic",
                                 align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(resized.pos_embed, expected_pos)
    table = native.layers[2].attn.rel_pos_h.detach()              # global: 2*8-1 = 15 -> 2*4-1 = 7
    assert table.shape[0] == 15 and resized.layers[2].attn.rel_pos_h.shape[0] == 7
    source = np.clip((np.arange(7) + 0.5) * 15 / 7 - 0.5, 0, 14)   # linear, align_corners=False
    expected_rel = np.stack([np.interp(source, np.arange(15), column) for column in table.numpy().T], axis=1)
    np.testing.assert_allclose(resized.layers[2].attn.rel_pos_h.detach().numpy(), expected_rel, atol=1e-6)
    torch.testing.assert_close(resized.layers[0].attn.rel_pos_w, native.layers[0].attn.rel_pos_w)  # windowed
    torch.testing.assert_close(resized.layers[1].mlp.lin1.weight, native.layers[1].mlp.lin1.weight)
    assert runtimes["sam"].model.pos_embed.shape == (1, GRID, GRID, 64)
    assert runtimes["sam"].pixel_scale == 255.0
    np.testing.assert_allclose(np.array(runtimes["sam"].mean) / 255, IMAGENET_MEAN.flatten().numpy(), atol=1e-6)
    np.testing.assert_allclose(np.array(runtimes["sam"].std) / 255, IMAGENET_STD.flatten().numpy(), atol=1e-6)


def test_tokens_are_resampled_to_the_student_grid():
    from transformers import ViTConfig, ViTModel

    from extract.agents import dino

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**{**dino.TINY_CONFIG, "patch_size": 4}), add_pooling_layer=False)  # 8 x 8 grid
    runtime = dino.DinoRuntime(model, STUDENT, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert runtime.native_grid == 8 and runtime.grid == GRID
    pixels = torch.randn(2, 3, 32, 32)
    tokens = runtime.encode(pixels)
    assert tokens.shape == (2, 3, GRID * GRID, 64)
    with torch.no_grad():
        native = runtime.block_outputs(pixels)                     # [B, L, 8, 8, D]
    expected = F.interpolate(native.flatten(0, 1).permute(0, 3, 1, 2), size=(GRID, GRID), mode="bilinear",
                             antialias=True).permute(0, 2, 3, 1).reshape(2, 3, GRID * GRID, 64)
    torch.testing.assert_close(tokens, expected)


def test_fingerprint_follows_what_changes_the_numbers(images):
    base = vision.fingerprint_fields(context(images))
    json.dumps(base)
    assert vision.fingerprint_fields(context(images, views=4)) == base   # more views = more rows, same numbers
    for change in [dict(layers=(0,)), dict(token_pool=2), dict(dtype="int8"), dict(view_spec=ViewSpec(seed=1))]:
        assert vision.fingerprint_fields(context(images, **change)) != base, change


def test_bad_inputs_are_named(images, runtimes):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        vision.compute(runtimes["dino"], [("missing.png", 0)], context(images))
    with pytest.raises(ValueError, match="dtype"):
        vision.arrays(runtimes["dino"], context(images, dtype="bfloat16"))
    other = StudentGrid("ViT-B-16", "openai", 224, 16, 768, 12)
    with pytest.raises(ValueError, match="student"):
        vision.compute(runtimes["dino"], [(images[1][0], 0)], context(images, student=other))


def test_specs_and_hub_errors(monkeypatch, tmp_path):
    for name in AGENTS:
        spec = get_agent(name)
        assert spec.family == "vision" and {"tokens", "token_mean", "views"} <= set(spec.emits)
        json.dumps(spec.fingerprint_fields(tiny=True)), json.dumps(spec.fingerprint_fields(tiny=False))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(OSError, match="--agent-path dino=DIR"):
        get_agent("dino").load(LoadRequest(tiny=False, student=STUDENT))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_agent("mae").load(LoadRequest(tiny=False, student=STUDENT, source=Source(local_path=str(tmp_path / "x"))))


@pytest.mark.slow
def test_real_size_shapes():
    """ViT-B/16 geometry with random weights: SAM-B built at 1024 px and resized to 224, DINO at 224."""
    from transformers import SamVisionConfig, ViTConfig, ViTModel
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    from extract.agents import dino, sam

    student = StudentGrid("ViT-B-16", "openai", 224, 16, 768, 12)
    encoder = sam.at_image_size(SamVisionEncoder(SamVisionConfig()), 224)
    assert encoder.layers[2].attn.rel_pos_h.shape == (27, 64) and encoder.pos_embed.shape == (1, 14, 14, 768)
    sam_runtime = sam.SamRuntime(encoder, student, mean=sam.SAM_PIXEL_MEAN, std=sam.SAM_PIXEL_STD, pixel_scale=255)
    dino_runtime = dino.DinoRuntime(ViTModel(ViTConfig(), add_pooling_layer=False), student, mean=(0.5,) * 3,
                                    std=(0.5,) * 3)
    for runtime in (sam_runtime, dino_runtime):
        assert runtime.encode(torch.randn(1, 3, 224, 224)).shape == (1, 12, 196, 768)
