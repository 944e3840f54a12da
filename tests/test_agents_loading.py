"""A teacher never loads silently random: each agent's real loader, on a tiny checkpoint laid out as its real
weights are, uses exactly its documented key allowance, and copies with a tensor removed, renamed or added are
refused naming the agent, the count and the keys."""
import shutil

import pytest
import torch

import agent_checkpoints as ckpt
from extract.agents import LoadRequest, Source, get_agent
from extract.loading import KeyAllowance, WeightsMismatch, load_model, recording

# agent -> (builder, {model class: (allowed missing keys used, allowed unexpected keys used)}); None = every key
# the loader reports matches the agent's allowance and at least one does (the count is checked separately)
EXPECTED = {
    "dino": (ckpt.save_dino, {"ViTModel": ([], [])}),
    "mae": (ckpt.save_mae, {"ViTMAEModel": ([], None)}),
    "sam": (ckpt.save_sam, {"SamModel": ([], [])}),
    "vitdet": (ckpt.save_vitdet, {"VitDetModel": ([], [])}),
    "bert": (ckpt.save_bert, {"BertModel": ([], ["pooler.dense.bias", "pooler.dense.weight"])}),
    "vicuna": (ckpt.save_vicuna, {"LlamaForCausalLM": ([], [])}),
    "blip2": (ckpt.save_blip2, {"Blip2Model": ([], [])}),
    "sd": (ckpt.save_sd, {"UNet2DConditionModel": ([], []), "AutoencoderKL": ([], []), "CLIPTextModel": ([], [])}),
    "pixart": (ckpt.save_pixart, {"PixArtTransformer2DModel": ([], []), "AutoencoderKL": ([], []),
                                  "T5EncoderModel": ([], [])}),
    "shikra": (ckpt.save_shikra, {"CLIPVisionModel": ([], []), "LlamaModel": ([], ["lm_head.weight"])}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-layout")
    return {name: builder(root / name) for name, (builder, _) in EXPECTED.items()}


def load_recorded(agent, directory):
    request = LoadRequest(tiny=False, student=ckpt.STUDENT, source=Source(local_path=str(directory)))
    with recording() as loaded:
        if agent == "vicuna":  # its LLM (the runtime itself holds the student's CLIP, tested below)
            from extract.agents.vicuna import load_llm

            return load_llm(request), loaded
        return get_agent(agent).load(request), loaded


@pytest.mark.parametrize("agent", sorted(EXPECTED))
def test_the_real_layout_loads_with_exactly_the_allowance(agent, checkpoints):
    from extract.preflight import runtime_modules

    _, expected = EXPECTED[agent]
    runtime, loaded = load_recorded(agent, checkpoints[agent])
    assert [record.model for record in loaded] == list(expected)
    allowance = get_agent(agent).allowance
    # the allowance never covers a tensor the model runs, nor an arbitrary extra one
    keys = [key for module in runtime_modules(runtime) for key in module.state_dict()]
    assert keys and not any(allowance.allows("missing", key) for key in keys)
    assert not allowance.allows("unexpected", "extra_head.weight")
    for record in loaded:
        missing, unexpected = expected[record.model]
        assert record.missing == missing, record.model
        if unexpected is None:  # MAE: the whole pixel decoder of the pre-training checkpoint, and nothing else
            assert record.unexpected and all(allowance.allows("unexpected", key) for key in record.unexpected)
            saved = ckpt.load_file(checkpoints[agent] / "model.safetensors")
            assert len(record.unexpected) == sum(key.startswith("decoder.") for key in saved)
        else:
            assert record.unexpected == unexpected, record.model
        assert record.commit is None and record.source == f"local:{checkpoints[agent]}"
    used = {pattern for record in loaded for kind in ("missing", "unexpected") for key in getattr(record, kind)
            for pattern in getattr(allowance, kind) if allowance.allows(kind, key)}
    if agent not in HUB_LAYOUT_NEEDS_NO_ALLOWANCE:  # no pattern is broader than what the real layout needs
        assert used == set(allowance.missing + allowance.unexpected)


# facebook/dino-vitb16 was saved without the pooler; DINO's allowance is for copies saved with ViTModel's default.
HUB_LAYOUT_NEEDS_NO_ALLOWANCE = {"dino"}


def test_dino_allows_the_pooler_of_a_default_vitmodel_copy(tmp_path):
    _, loaded = load_recorded("dino", ckpt.save_dino(tmp_path / "dino", pooler=True))
    assert [(r.missing, r.unexpected) for r in loaded] == [([], ["pooler.dense.bias", "pooler.dense.weight"])]


# One representative per family and loader kind (transformers vision/text, diffusers, a composite model).
FAMILIES = {"dino": "", "bert": "", "sd": "unet", "blip2": ""}


def _middle_weight(state):
    keys = sorted(key for key in state if key.endswith(".weight") and "embed" not in key and "norm" not in key)
    return keys[len(keys) // 2]


PERTURBATIONS = {
    "removed": lambda state, key: state.pop(key),
    "renamed": lambda state, key: state.__setitem__(key.replace(".weight", ".weights"), state.pop(key)),
    "added": lambda state, key: state.__setitem__("extra_head.weight", torch.zeros(3)),
}


@pytest.mark.parametrize("agent", sorted(FAMILIES))
@pytest.mark.parametrize("kind", sorted(PERTURBATIONS))
def test_a_copy_with_a_tensor_removed_renamed_or_added_is_refused(agent, kind, checkpoints, tmp_path):
    copy = shutil.copytree(checkpoints[agent], tmp_path / agent)
    target = copy / FAMILIES[agent]
    chosen = []
    ckpt.edit_weights(target, lambda state: (chosen.append(_middle_weight(state)),
                                             PERTURBATIONS[kind](state, chosen[0])))
    with pytest.raises(WeightsMismatch) as refused:
        load_recorded(agent, copy)
    message = str(refused.value)
    assert f"agent {agent!r}" in message and "Refusing to run" in message
    assert ("1 missing key(s)" in message) == (kind in ("removed", "renamed"))
    assert ("1 unexpected key(s)" in message) == (kind in ("renamed", "added"))
    if kind != "removed":  # unexpected keys are named (a renamed one as the loader maps it, with its new suffix)
        assert ("extra_head.weight" if kind == "added" else ".weights") in message


def test_a_tensor_of_another_shape_is_refused(checkpoints, tmp_path):
    copy = shutil.copytree(checkpoints["vitdet"], tmp_path / "vitdet")
    ckpt.edit_weights(copy, lambda state: state.__setitem__("embeddings.projection.bias", torch.zeros(3)))
    with pytest.raises((WeightsMismatch, RuntimeError), match="(?i)mismatch|shape"):
        load_recorded("vitdet", copy)


def test_allowance_patterns_and_the_refusal_message(checkpoints):
    from transformers import ViTModel

    strict = KeyAllowance()
    with pytest.raises(WeightsMismatch, match=r"2 unexpected key\(s\) \(pooler.dense.bias, pooler.dense.weight\)"):
        load_model(ViTModel, Source(local_path=str(ckpt.save_dino(checkpoints["dino"].parent / "pooled", True))),
                   "dino", strict, add_pooling_layer=False)
    assert KeyAllowance(unexpected=("decoder.*",)).allows("unexpected", "decoder.decoder_pred.bias")
    assert not KeyAllowance(unexpected=("decoder.*",)).allows("missing", "decoder.decoder_pred.bias")
    assert not KeyAllowance(unexpected=("decoder.*",)).allows("unexpected", "vit.decoder.x")


def test_model_classes_cannot_bypass_the_key_check():
    from transformers import ViTModel

    from extract.loading import from_pretrained

    with pytest.raises(TypeError, match="load_model"):
        from_pretrained(ViTModel.from_pretrained, Source(local_path="."), "dino")


def test_the_student_text_encoder_loads_strictly(tmp_path):
    """gpt3 and vicuna encode with the student CLIP: open_clip loads a checkpoint with strict=True."""
    import open_clip

    from extract.families.language import ClipTextEncoder
    from pipelines.presets import register_model_configs

    register_model_configs()
    state = open_clip.create_model(ckpt.STUDENT.model).state_dict()
    state.pop("text_projection")
    torch.save(state, tmp_path / "student.pt")
    student = ckpt.STUDENT.__class__(**{**ckpt.STUDENT.__dict__, "pretrained": str(tmp_path / "student.pt")})
    with pytest.raises(RuntimeError, match="(?s)cannot build the student CLIP.*text_projection"):
        ClipTextEncoder(student)
