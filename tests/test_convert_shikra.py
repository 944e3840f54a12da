"""Shikra conversion on tiny checkpoints in the published formats: LLaMA base (safetensors), Shikra delta
(pytorch_model.bin with grown embeddings and the projector), CLIP vision tower; then the agent loads the result."""
import json

import numpy as np
import pytest
import torch

from extract.agents import get_agent
from extract.agents.base import LoadRequest, Source
from extract.agents.shikra import build_tiny
from extract.convert import get_converter
from extract.convert.shikra import LANGUAGE_DIR, MANIFEST, apply_delta, convert, load_converted
from pipelines.presets import student_spec

STUDENT = student_spec("tiny")
ADDED_TOKENS = ["<im_start>", "<im_end>", "<im_patch>"]  # Shikra adds tokens: its embeddings have extra rows


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(base dir, delta dir, vision tower dir, base state, delta state) in the formats that are published."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("shikra")
    vision_tower, projector, language_model, tokenizer = build_tiny(seed=0)
    torch.manual_seed(1)
    base_model = LlamaForCausalLM(language_model.config)
    base_model.save_pretrained(root / "llama-7b")
    tokenizer.save_pretrained(root / "llama-7b")
    base = {k: v.clone() for k, v in base_model.state_dict().items()}

    generator = torch.Generator().manual_seed(2)
    delta = {}
    for name, tensor in base.items():
        shape = list(tensor.shape)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            shape[0] += len(ADDED_TOKENS)
        delta[name] = 0.01 * torch.randn(shape, generator=generator)
    delta["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints persisted this buffer
    delta["model.mm_projector.weight"] = torch.randn(projector.weight.shape, generator=generator)
    delta["model.mm_projector.bias"] = torch.randn(projector.bias.shape, generator=generator)
    (root / "shikra-7b-delta").mkdir()
    torch.save(delta, root / "shikra-7b-delta" / "pytorch_model.bin")
    tokenizer.add_tokens(ADDED_TOKENS, special_tokens=True)
    tokenizer.save_pretrained(root / "shikra-7b-delta")
    vision_tower.save_pretrained(root / "clip-vit-large-patch14")
    return root, base, delta, vision_tower


@pytest.fixture(scope="module")
def converted(published):
    root, *_ = published
    # a tiny shard size forces the sharded layout (index + several files) a 7B model gets
    return convert(root / "shikra-7b-delta", root / "shikra-7b", base=root / "llama-7b",
                   vision_tower=str(root / "clip-vit-large-patch14"), dtype="float32", shard_bytes=64 * 1024)


def test_conversion_adds_the_delta_to_the_base(published, converted):
    root, base, delta, vision_tower = published
    assert get_converter("shikra") is convert
    language_dir = converted / LANGUAGE_DIR
    assert (language_dir / "model.safetensors.index.json").is_file()
    assert len(list(language_dir.glob("model-*.safetensors"))) > 1
    manifest = json.loads((converted / MANIFEST).read_text())
    assert manifest["base"] == "llama-7b" and manifest["delta"] == "shikra-7b-delta" and "/" not in manifest["base"]
    assert not converted.with_name("shikra-7b.partial").exists()

    tower, projector, language_model, tokenizer = load_converted(converted, torch.float32)
    merged = language_model.state_dict()
    for name, value in merged.items():
        key = "model." + name
        if key == "model.embed_tokens.weight":
            rows = base[key].shape[0]
            torch.testing.assert_close(value[:rows], base[key] + delta[key][:rows])
            torch.testing.assert_close(value[rows:], delta[key][rows:])  # the added tokens: delta only
        else:
            torch.testing.assert_close(value, base[key] + delta[key])
    assert language_model.config.vocab_size == base["model.embed_tokens.weight"].shape[0] + len(ADDED_TOKENS)
    assert len(tokenizer) == language_model.config.vocab_size  # the delta's tokenizer, with Shikra's tokens
    torch.testing.assert_close(projector.weight, delta["model.mm_projector.weight"])
    torch.testing.assert_close(projector.bias, delta["model.mm_projector.bias"])
    for name, value in tower.state_dict().items():
        torch.testing.assert_close(value, vision_tower.state_dict()[name])


def test_the_agent_loads_the_converted_directory(converted, published):
    from safetensors.torch import load_file

    request = LoadRequest(tiny=False, student=STUDENT, source=Source(local_path=str(converted)))
    runtime = get_agent("shikra").load(request)
    assert runtime.image_size == 224 and runtime.vision_layer == -2
    shard = load_file(next((converted / LANGUAGE_DIR).glob("model-*.safetensors")))  # full LlamaForCausalLM keys
    assert all(key.startswith(("model.", "lm_head.")) for key in shard)

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = runtime.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        expected = torch.nn.functional.normalize(runtime.projector(hidden[:, 1:]).mean(dim=1), dim=-1)
    torch.testing.assert_close(runtime.image_features(pixels), expected)
    text = runtime.class_features(["a photo of a river.", "a photo of a forest."])
    assert text.shape == (2, runtime.feature_dim) and torch.isfinite(text).all()


def test_conversion_refuses_a_non_empty_output(published, converted):
    root, *_ = published
    with pytest.raises(FileExistsError, match="not empty"):
        convert(root / "shikra-7b-delta", converted, base=root / "llama-7b",
                vision_tower=str(root / "clip-vit-large-patch14"))
    with pytest.raises(FileNotFoundError, match="base directory"):
        convert(root / "shikra-7b-delta", root / "elsewhere", base=root / "no-such-llama")


def test_apply_delta_rejects_what_is_not_a_shikra_delta():
    base = {"model.norm.weight": torch.ones(4), "lm_head.weight": torch.zeros(5, 4)}
    projector = {"model.mm_projector.weight": torch.ones(4, 2), "model.mm_projector.bias": torch.ones(4)}
    language, proj = apply_delta(base, {**base, **projector, "lm_head.weight": torch.ones(7, 4)}, torch.float32)
    assert language["lm_head.weight"].shape == (7, 4) and proj["bias"].shape == (4,)
    with pytest.raises(KeyError, match="model.vision_tower.x"):
        apply_delta(base, {**base, **projector, "model.vision_tower.x": torch.ones(1)}, torch.float32)
    with pytest.raises(ValueError, match="projector"):
        apply_delta(base, dict(base), torch.float32)
    with pytest.raises(ValueError, match="lacks"):
        apply_delta(base, {"model.norm.weight": torch.ones(4), **projector}, torch.float32)
    with pytest.raises(ValueError, match="does not fit"):
        apply_delta(base, {**base, **projector, "model.norm.weight": torch.ones(5)}, torch.float32)
    merged, _ = apply_delta(base, {**base, **projector}, torch.float16)
    assert merged["model.norm.weight"].dtype == torch.float16
    np.testing.assert_array_equal(merged["model.norm.weight"].numpy(), np.full(4, 2, dtype=np.float16))
