"""Image-to-text agents (blip2, shikra) on tiny random models: compute() equals the models' own outputs run live,
padding never reaches the class features, and any class subset's scores are a slice of the full set's."""
import numpy as np
import pytest
import torch
from PIL import Image

from extract.agents import get_agent
from extract.agents.base import LoadRequest, Source
from extract.families import ExtractContext
from extract.families import i2t
from pipelines.presets import student_spec

STUDENT = student_spec("tiny")
CLASSNAMES = ["Annual Crop Land", "Forest", "Highway or Road", "River", "Sea or Lake"]
TEMPLATE = "a centered satellite photo of {}."
SIZES = [(40, 28), (25, 36), (32, 32)]
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32).reshape(3, 1, 1)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32).reshape(3, 1, 1)


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


@pytest.fixture(scope="module", params=["blip2", "shikra"])
def agent(request):
    return request.param, get_agent(request.param).load(LoadRequest(tiny=True, student=STUDENT, seed=0))


def reference_pixels(image_root, keys, size):
    """View 0 (centre square, bicubic box resize as cache_schema does), CLIP mean/std."""
    batch = []
    for key in keys:
        image = Image.open(image_root / key).convert("RGB")
        side = min(image.size)
        x0, y0 = (image.width - side) // 2, (image.height - side) // 2
        view = image.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
        batch.append((np.asarray(view, dtype=np.float32).transpose(2, 0, 1) / 255.0 - CLIP_MEAN) / CLIP_STD)
    return torch.from_numpy(np.stack(batch))


def live_image_features(name, runtime, pixels):
    """The library's own calls: BLIP-2 `get_qformer_features` (first query token = the pooled output, projected);
    Shikra's tower at the penultimate layer, patch tokens, projector, mean."""
    if name == "blip2":
        features = runtime.model.language_projection(runtime.model.get_qformer_features(pixel_values=pixels)[:, 0])
    else:
        hidden = runtime.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        features = runtime.projector(hidden[:, 1:]).mean(dim=1)
    return torch.nn.functional.normalize(features, dim=-1)


def live_text_features(name, runtime, prompts):
    """One prompt at a time (no padding at all): the LLM's hidden_states[-1], mean over the prompt's tokens."""
    vectors = []
    for prompt in prompts:
        ids = runtime.tokenizer(prompt, return_tensors="pt").input_ids
        if name == "blip2":
            hidden = runtime.model.get_text_features(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        else:
            hidden = runtime.language_model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        vectors.append(hidden[0].mean(dim=0))
    return torch.nn.functional.normalize(torch.stack(vectors), dim=-1)


def test_compute_equals_the_live_models(agent, image_root):
    name, runtime = agent
    ctx = context(image_root)
    rows = i2t.rows(ctx)
    assert rows == [(key, 0) for key in ctx.keys]
    out = i2t.compute(runtime, rows, ctx)
    specs = i2t.arrays(runtime, ctx)
    assert set(out) == set(get_agent(name).emits) == set(specs)
    for array, spec in specs.items():
        assert out[array].shape == (len(rows), *spec.row_shape) and out[array].dtype == spec.numpy_dtype
    with torch.no_grad():
        image = live_image_features(name, runtime, reference_pixels(image_root, ctx.keys, runtime.image_size))
        text = live_text_features(name, runtime, [TEMPLATE.format(c) for c in CLASSNAMES])
    np.testing.assert_allclose(out["image_features"], image.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["scores"], (image @ text.T).numpy(), rtol=0, atol=1e-5)
    assert np.ptp(out["scores"], axis=1).min() > 1e-3  # classes are told apart


def test_padding_never_reaches_the_class_features(agent):
    """A prompt's feature is the same alone and in a batch padded to a much longer prompt."""
    _, runtime = agent
    short, long = "a photo of a river.", "a centered satellite photo of a very long and winding river in a valley."
    alone = runtime.class_features([short])
    batched = runtime.class_features([short, long])
    torch.testing.assert_close(batched[0], alone[0], rtol=0, atol=1e-5)
    assert batched.norm(dim=-1).sub(1).abs().max() < 1e-5


def test_class_features_do_not_depend_on_the_text_batch(agent, monkeypatch):
    name, runtime = agent
    prompts = [f"a photo of number {i}." for i in range(5)]
    monkeypatch.setattr(i2t, "TEXT_BATCH", 2)
    with torch.no_grad():
        torch.testing.assert_close(runtime.class_features(prompts), live_text_features(name, runtime, prompts),
                                   rtol=0, atol=1e-5)


def test_scores_of_a_class_subset_are_a_slice(agent, image_root):
    _, runtime = agent
    full = context(image_root)
    subset_names = [CLASSNAMES[3], CLASSNAMES[0]]
    subset = context(image_root, subset_names, class_set="base")
    full_scores = i2t.compute(runtime, i2t.rows(full), full)["scores"]
    subset_out = i2t.compute(runtime, i2t.rows(subset), subset)
    np.testing.assert_allclose(subset_out["scores"], full_scores[:, [3, 0]], rtol=0, atol=1e-6)


def test_fingerprint_has_classnames_and_template_but_not_the_class_set(image_root):
    fields = i2t.fingerprint_fields(context(image_root))
    assert fields["classnames"] == CLASSNAMES and fields["template"] == TEMPLATE and "class_set" not in fields
    assert i2t.fingerprint_fields(context(image_root, class_set="base")) == fields
    assert i2t.fingerprint_fields(context(image_root, template="a photo of a {}.")) != fields


def test_shikra_reads_the_penultimate_vision_layer(image_root):
    runtime = get_agent("shikra").load(LoadRequest(tiny=True, student=STUDENT, seed=0))
    assert runtime.vision_layer == -2 == get_agent("shikra").preprocessing["vision_layer"]
    pixels = reference_pixels(image_root, ["c0/img.png"], runtime.image_size)
    with torch.no_grad():
        last = runtime.vision_tower(pixel_values=pixels).last_hidden_state  # the official extractor's choice
        last = torch.nn.functional.normalize(runtime.projector(last[:, 1:]).mean(dim=1), dim=-1)
    assert not torch.allclose(runtime.image_features(pixels), last, atol=1e-3)


def test_float16_runs_match_float32(image_root):
    """The GPU precision on CPU: a float16 tiny BLIP-2 agrees with the float32 one within fp16 tolerance."""
    ctx = context(image_root)
    full = i2t.compute(get_agent("blip2").load(LoadRequest(tiny=True, student=STUDENT)), i2t.rows(ctx), ctx)
    half = i2t.compute(get_agent("blip2").load(LoadRequest(tiny=True, student=STUDENT, dtype="float16")),
                       i2t.rows(ctx), ctx)
    assert half["scores"].dtype == np.float32
    np.testing.assert_allclose(half["scores"], full["scores"], rtol=0, atol=2e-2)


def test_tiny_agents_are_seeded(image_root):
    ctx = context(image_root, CLASSNAMES[:2])
    runs = [i2t.compute(get_agent("blip2").load(LoadRequest(tiny=True, student=STUDENT, seed=s)), i2t.rows(ctx), ctx)
            for s in (1, 1, 2)]
    np.testing.assert_array_equal(runs[0]["scores"], runs[1]["scores"])
    assert not np.allclose(runs[0]["scores"], runs[2]["scores"])


def test_loading_errors_are_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="(?s)'blip2'.*HF_HUB_OFFLINE=1"):
        get_agent("blip2").load(LoadRequest(tiny=False, student=STUDENT))
    with pytest.raises(ValueError, match="agents convert shikra"):
        get_agent("shikra").load(LoadRequest(tiny=False, student=STUDENT))
    with pytest.raises(FileNotFoundError, match="not a converted Shikra directory"):
        get_agent("shikra").load(LoadRequest(tiny=False, student=STUDENT, source=Source(local_path=str(tmp_path))))
