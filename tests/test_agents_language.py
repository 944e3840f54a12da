"""Language agents (gpt3, vicuna, bert): tiny configs run offline; class features equal a direct computation with
the stage-2 student's CLIP text encoder (open_clip built under torch.manual_seed(0)) or the sentence encoder."""
import functools
import json

import numpy as np
import pytest
import torch

from extract.agents import LoadRequest, get_agent
from extract.families import ExtractContext, language
from pipelines.presets import register_model_configs, student_spec

AGENTS = ("gpt3", "vicuna", "bert")
CLASSNAMES = ["Annual Crop Land", "Sea or Lake", "Herbaceous Vegetation Land"]
DESCRIPTIONS = {  # keys as description files spell them: case and '_' differ from the class names
    "annual_crop_land": ["Rows of green crops in a field.", "A patchwork of farmland."],
    "SEA OR LAKE": ["A calm blue body of water."],
    "Herbaceous Vegetation Land": ["Wild grass and shrubs.", "Low green plants.", "A meadow seen from above."],
    "Forest": ["Dense trees."],
}
QUICK = {"questions": ["What does {} look like?", "A description of an image of {}:"], "generations": 2,
         "max_new_tokens": 6}
STUDENT = student_spec("tiny")


@pytest.fixture(scope="module")
def runtimes():
    register_model_configs()
    return {name: get_agent(name).load(LoadRequest(tiny=True, student=STUDENT, seed=0)) for name in AGENTS}


@pytest.fixture
def descriptions_file(tmp_path):
    path = tmp_path / "EuroSAT_prompts.json"
    path.write_text(json.dumps(DESCRIPTIONS))
    return path


def context(tmp_path, **overrides):
    fields = dict(dataset="synthetic", image_root=tmp_path, keys=[], classnames=list(CLASSNAMES),
                  template="a centered satellite photo of {}.", student=STUDENT)
    return ExtractContext(**{**fields, **overrides})


@functools.lru_cache(maxsize=1)
def student_clip():
    """The student exactly as stage 2 builds it."""
    import open_clip

    register_model_configs()
    torch.manual_seed(0)
    return open_clip.create_model(STUDENT.model, pretrained=None).eval(), open_clip.get_tokenizer(STUDENT.model)


def student_text_features(texts):
    model, tokenizer = student_clip()
    with torch.no_grad():
        return model.encode_text(tokenizer(texts))


def expected_class_features(descriptions):
    means = [student_text_features(texts).mean(dim=0) for texts in descriptions]
    return torch.nn.functional.normalize(torch.stack(means), dim=-1).numpy()


def run(runtime, ctx):
    return language.compute(runtime, language.rows(ctx), ctx)["class_features"]


def test_gpt3_matches_the_student_text_encoder(runtimes, descriptions_file, tmp_path):
    ctx = context(tmp_path, options={"descriptions": str(descriptions_file)})
    assert language.rows(ctx) == [(name, 0) for name in CLASSNAMES]
    features = run(runtimes["gpt3"], ctx)
    assert language.arrays(runtimes["gpt3"], ctx)["class_features"].row_shape == (32,)
    assert features.shape == (3, 32) and features.dtype == np.float32
    expected = expected_class_features([DESCRIPTIONS["annual_crop_land"], DESCRIPTIONS["SEA OR LAKE"],
                                        DESCRIPTIONS["Herbaceous Vegetation Land"]])
    np.testing.assert_allclose(features, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    stored = json.loads(language.extra_files(runtimes["gpt3"], ctx)["descriptions.json"])
    assert list(stored) == CLASSNAMES and stored["Sea or Lake"] == DESCRIPTIONS["SEA OR LAKE"]
    subset = language.compute(runtimes["gpt3"], [("Sea or Lake", 0)], ctx)["class_features"]
    np.testing.assert_allclose(subset[0], features[1], atol=1e-6)  # a class's row does not depend on the others


def test_gpt3_needs_every_class(runtimes, tmp_path):
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"annual crop land": ["Fields."]}))
    with pytest.raises(ValueError, match="'Sea or Lake', 'Herbaceous Vegetation Land'"):
        run(runtimes["gpt3"], context(tmp_path, options={"descriptions": str(partial)}))
    with pytest.raises(ValueError, match="descriptions"):
        run(runtimes["gpt3"], context(tmp_path))
    with pytest.raises(ValueError, match="unknown option"):
        run(runtimes["gpt3"], context(tmp_path, options={"descriptions": str(partial), "typo": 1}))
    partial.write_text(json.dumps({"annual crop land": "Fields."}))
    with pytest.raises(ValueError, match="non-empty list"):
        run(runtimes["gpt3"], context(tmp_path, options={"descriptions": str(partial)}))


def test_text_encoder_leaves_the_global_rng_alone():
    register_model_configs()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    get_agent("gpt3").load(LoadRequest(tiny=True, student=STUDENT))
    assert torch.equal(torch.rand(3), expected)


def test_fingerprint_fields(descriptions_file, tmp_path):
    ctx = context(tmp_path, options={"descriptions": str(descriptions_file)})
    fields = language.fingerprint_fields(ctx)
    json.dumps(fields)
    assert fields["classnames"] == CLASSNAMES and fields["template"] == ctx.template
    assert fields["student"] == {"model": STUDENT.model, "pretrained": None}
    assert "descriptions" not in fields["options"] and len(fields["options"]["descriptions_sha256"]) == 64
    descriptions_file.write_text(json.dumps({**DESCRIPTIONS, "Forest": ["Tall trees."]}))
    assert language.fingerprint_fields(ctx) != fields
    quick = language.fingerprint_fields(context(tmp_path, options=QUICK))
    assert quick != language.fingerprint_fields(context(tmp_path))


def test_vicuna_generates_stores_and_encodes_its_descriptions(runtimes, tmp_path):
    ctx = context(tmp_path, options=dict(QUICK))
    features = run(runtimes["vicuna"], ctx)
    stored = language.extra_files(runtimes["vicuna"], ctx)["descriptions.json"]
    descriptions = json.loads(stored)
    assert list(descriptions) == CLASSNAMES
    assert all(len(texts) == 4 and all(text.strip() for text in texts) for texts in descriptions.values())
    assert descriptions[CLASSNAMES[0]] != descriptions[CLASSNAMES[1]]
    np.testing.assert_allclose(features, expected_class_features(list(descriptions.values())), atol=1e-5)
    fresh = get_agent("vicuna").load(LoadRequest(tiny=True, student=STUDENT, seed=0))
    backwards = context(tmp_path, options=dict(QUICK), classnames=CLASSNAMES[::-1])
    stored_backwards = json.loads(language.extra_files(fresh, backwards)["descriptions.json"])
    assert stored_backwards == descriptions   # each sample seeded by (class, question, i): order and runs agree
    np.testing.assert_array_equal(run(fresh, ctx), features)


def test_vicuna_samples_each_answer_independently_from_its_own_seed(runtimes, tmp_path):
    """10 independent samples per question as the official counts imply (not the N best beams of one search),
    sample i of (class, question) drawn after seeding torch with sample_seed(class, question, i)."""
    from extract.agents.vicuna import CHAT_TEMPLATE, sample_seed

    runtime = runtimes["vicuna"]
    question = QUICK["questions"][0]
    settings = runtime.settings(context(tmp_path, options={"questions": [question], "generations": 2}))
    answers = runtime.ask("Forest", question, settings)
    assert len(answers) == 2 and answers[0] != answers[1]
    model, tokenizer = runtime.llm()
    prompt = tokenizer(CHAT_TEMPLATE.format(question=question.format("Forest")), return_tensors="pt")
    torch.manual_seed(sample_seed("Forest", question, 1))
    with torch.no_grad():
        out = model.generate(**prompt, do_sample=True, temperature=settings["temperature"], top_k=0, top_p=1.0,
                             max_new_tokens=settings["max_new_tokens"], pad_token_id=tokenizer.pad_token_id)
    assert " ".join(tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).split()) \
        == answers[1]
    assert CHAT_TEMPLATE.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert sample_seed("Forest", question, 1) not in (sample_seed("Forest", question, 2),
                                                      sample_seed("River", question, 1))


def test_vicuna_reads_a_descriptions_file_without_loading_the_llm(descriptions_file, tmp_path):
    runtime = get_agent("vicuna").load(LoadRequest(tiny=True, student=STUDENT))
    ctx = context(tmp_path, options={"descriptions": str(descriptions_file)})
    features = run(runtime, ctx)
    assert runtime._llm is None
    np.testing.assert_allclose(features, expected_class_features(
        [DESCRIPTIONS["annual_crop_land"], DESCRIPTIONS["SEA OR LAKE"], DESCRIPTIONS["Herbaceous Vegetation Land"]]),
        atol=1e-5)
    for bad in [{"questions": ["no placeholder"]}, {"generations": 0}, {"max_new_tokens": "8"}]:
        with pytest.raises(ValueError, match="vicuna"):
            run(runtime, context(tmp_path, options=bad))


def test_bert_mean_pools_real_tokens(runtimes, tmp_path):
    ctx = context(tmp_path)
    runtime = runtimes["bert"]
    features = run(runtime, ctx)
    assert features.shape == (3, runtime.model.config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    for index, name in enumerate(CLASSNAMES):  # one at a time: no padding, a plain mean over the tokens
        tokens = runtime.tokenizer(ctx.template.format(name), return_tensors="pt")
        with torch.no_grad():
            mean = runtime.model(**tokens).last_hidden_state[0].mean(dim=0)
        np.testing.assert_allclose(features[index], (mean / mean.norm()).numpy(), atol=1e-5)
    assert language.extra_files(runtime, ctx) == {}
    with pytest.raises(ValueError, match="template"):
        run(runtime, context(tmp_path, template="a photo"))


def test_specs_and_hub_errors(monkeypatch, tmp_path):
    for name in AGENTS:
        spec = get_agent(name)
        assert spec.family == "language" and spec.emits == ("class_features",)
        json.dumps(spec.fingerprint_fields(tiny=True)), json.dumps(spec.fingerprint_fields(tiny=False))
    register_model_configs()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(OSError, match="--agent-path bert=DIR"):
        get_agent("bert").load(LoadRequest(tiny=False, student=STUDENT))
    vicuna = get_agent("vicuna").load(LoadRequest(tiny=False, student=STUDENT))  # the LLM loads on first use
    with pytest.raises(OSError, match="lmsys/vicuna-7b-v1.5"):
        run(vicuna, context(tmp_path, options=QUICK))
