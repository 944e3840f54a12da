"""The student: depth-0 equivalence with open_clip, prompt placement, trainable set, prompt checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from distill.config import PromptConfig
from distill.student import Student, build_student, student_geometry
from pipelines.presets import register_model_configs, student_spec

TINY = "TransAgent-Tiny-CLIP"
NAMES = ["annual crop land", "forest", "sea or lake"]


@pytest.fixture(scope="module", autouse=True)
def _configs():
    register_model_configs()


def prompts(depth, n_ctx=4, **kwargs) -> PromptConfig:
    """The same depth and token count in both towers."""
    return PromptConfig(depth_vision=depth, depth_text=depth, n_ctx_vision=n_ctx, n_ctx_text=n_ctx, **kwargs)


def tiny(prompt_depth=2, seed=0, n_ctx=4, classnames=None, **kwargs):
    torch.manual_seed(seed)   # prompt init draws from the caller's RNG
    return build_student(TINY, pretrained=None, prompts=prompts(prompt_depth, n_ctx, **kwargs), classnames=classnames)


def pixels(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_random_build_is_seeded_and_leaves_caller_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_student(TINY, pretrained=None, prompts=prompts(0))
    assert torch.equal(torch.get_rng_state(), before)
    b = build_student(TINY, pretrained=None, prompts=prompts(0))
    sa, sb = a.clip.state_dict(), b.clip.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("grad", [False, True])
def test_depth0_image_tower_is_open_clip(grad):
    student = tiny(prompt_depth=0)
    x = pixels()
    with torch.set_grad_enabled(grad):
        features, tokens = student.encode_image(x)
        assert torch.equal(features, student.clip.encode_image(x))
        reference = student.clip.visual.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    expected = torch.stack([F.normalize(t, dim=-1) for t in reference["image_intermediates"]])
    assert tokens.shape == (3, 2, 16, 64)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("grad", [False, True])
def test_depth0_text_tower_is_open_clip(grad):
    student = tiny(prompt_depth=0)
    tokens = student.tokenizer([f"a photo of a {n}." for n in NAMES])
    with torch.set_grad_enabled(grad):
        expected = student.clip.encode_text(tokens)
        assert torch.equal(student.encode_text(NAMES), expected)
        assert torch.equal(student.encode_text(tokens), expected)


def test_depth0_logits_are_open_clip_logits():
    student = tiny(prompt_depth=0)
    x, tokens = pixels(), student.tokenizer([f"a photo of a {n}." for n in NAMES])
    with torch.no_grad():
        image_features, _ = student.encode_image(x, return_tokens=False)
        ours = student.logits(image_features, student.encode_text(NAMES))
        theirs, _ = student.clip.get_logits(x, tokens)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_prompted_shapes_and_normalised_tokens():
    student = tiny(prompt_depth=3, classnames=NAMES)
    features, tokens = student.encode_image(pixels(batch=3))
    assert features.shape == (3, 32)
    assert tokens.shape == (3, 3, 16, 64)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(3, 3, 16))
    assert student.encode_text().shape == (3, 32)
    assert student.encode_image(pixels(), return_tokens=False)[1] is None


def test_only_prompts_require_grad_and_counts():
    depth, n_ctx = 3, 4
    student = tiny(prompt_depth=depth, n_ctx=n_ctx)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    expected = {"text_ctx", "visual_ctx"} | {f"text_deep.{i}" for i in range(depth - 1)} \
        | {f"visual_deep.{i}" for i in range(depth - 1)}
    assert trainable == expected
    assert all(not p.requires_grad for p in student.clip.parameters())
    assert sum(p.numel() for p in student.trainable_parameters()) == depth * n_ctx * (64 + 64)
    assert all(p.dtype == torch.float32 for p in student.trainable_parameters())
    assert tiny(prompt_depth=0).trainable_parameters() == []


def test_text_context_starts_from_ctx_init_embeddings():
    student = tiny(prompt_depth=1)
    ids = student.tokenizer(["a photo of a"])[0, 1:5]
    assert torch.equal(student.text_ctx.data, student.clip.token_embedding.weight[ids])
    # depth 1 has no deep text prompts, so before training the text tower computes the zero-shot prompt exactly
    with torch.no_grad():
        assert torch.equal(student.encode_text(NAMES), tiny(prompt_depth=0).encode_text(NAMES))


def test_every_prompt_reaches_the_output():
    student = tiny(prompt_depth=3, classnames=NAMES)
    features, tokens = student.encode_image(pixels())
    loss = student.logits(features, student.encode_text()).logsumexp(dim=-1).sum() + tokens[-1].sum()
    loss.backward()
    for name, p in student.named_prompts().items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_deep_prompts_only_act_at_their_layers():
    student = tiny(prompt_depth=2)
    x = pixels()
    with torch.no_grad():
        _, before = student.encode_image(x)
        student.visual_deep[0].add_(1.0)
        _, after = student.encode_image(x)
    assert torch.equal(before[0], after[0])          # block 0 runs before the layer-1 prompt is inserted
    assert not torch.allclose(before[1], after[1])


def test_visual_ctx_goes_through_ln_pre_and_deep_prompts_do_not():
    """LayerNorm is scale-invariant per token: scaling a prompt that passes ln_pre changes nothing."""
    student = tiny(prompt_depth=2)
    x = pixels()
    with torch.no_grad():
        reference, _ = student.encode_image(x)
        student.visual_ctx.mul_(10.0)
        torch.testing.assert_close(student.encode_image(x)[0], reference, rtol=1e-4, atol=1e-5)
        student.visual_deep[0].mul_(10.0)
        assert not torch.allclose(student.encode_image(x)[0], reference, rtol=1e-2, atol=1e-3)


def test_train_mode_keeps_clip_in_eval():
    student = tiny(prompt_depth=1).train()
    assert student.training and not student.clip.training
    assert not any(m.training for m in student.clip.modules())


def test_prompt_checkpoint_round_trip():
    a, b = tiny(prompt_depth=2, seed=1), tiny(prompt_depth=2, seed=2)
    x = pixels()
    with torch.no_grad():
        assert not torch.equal(a.encode_image(x)[0], b.encode_image(x)[0])
        state = a.prompt_state_dict()
        assert set(state) == set(a.named_prompts())
        b.load_prompt_state_dict(state)
        assert torch.equal(a.encode_image(x)[0], b.encode_image(x)[0])
        assert torch.equal(a.encode_text(NAMES), b.encode_text(NAMES))
    with pytest.raises(ValueError, match="missing"):
        tiny(prompt_depth=3).load_prompt_state_dict(state)
    with pytest.raises(ValueError, match="shape"):
        b.load_prompt_state_dict({**state, "text_ctx": torch.zeros(3, 64)})


def test_geometry_helper():
    g = tiny(prompt_depth=0).geometry
    spec = student_spec("tiny")
    assert (g.image_size, g.patch_size, g.grid, g.num_tokens) == (spec.image_size, spec.patch_size, spec.grid, 16)
    assert (g.width, g.layers, g.text_width, g.text_layers, g.embed_dim) == (spec.width, spec.layers, 64, 3, 32)


def test_a_non_square_student_is_refused():
    """Views and cached token grids are square; a student of another input shape is refused when it is built,
    not half used (its height taken as its side)."""
    student = tiny(prompt_depth=0)
    student.clip.visual.image_size = (32, 48)
    with pytest.raises(ValueError, match="image_size is 32x48; only square inputs"):
        student_geometry(student.clip)


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="depth_vision"):
        tiny(prompt_depth=4)
    with pytest.raises(ValueError, match="ctx_init"):
        tiny(prompt_depth=1, n_ctx=3)
    with pytest.raises(ValueError, match="overwrite the class name"):
        tiny(prompt_depth=1, template="a {}.")
    with pytest.raises(ValueError, match="exactly one"):
        tiny(prompt_depth=1, template="a photo of a thing")
    with pytest.raises(ValueError, match="no class names"):
        tiny(prompt_depth=1).encode_text()
    student = tiny(prompt_depth=1, n_ctx=2, ctx_init=None)   # random init, any n_ctx
    assert student.text_ctx.shape == (2, 64)


def test_refuses_non_clip_models():
    with pytest.raises(TypeError, match="open_clip CLIP"):
        Student(torch.nn.Linear(2, 2), tokenizer=None)


@pytest.mark.slow
def test_vit_b16_prompt_count_and_token_shape():
    torch.manual_seed(0)
    student = build_student("ViT-B-16", pretrained=None, prompts=PromptConfig())
    assert sum(p.numel() for p in student.trainable_parameters()) == 46_080   # reference §4.2
    assert student_geometry(student.clip).grid == 14
    with torch.no_grad():
        features, tokens = student.encode_image(torch.randn(1, 3, 224, 224))
    assert features.shape == (1, 512) and tokens.shape == (12, 1, 196, 768)
