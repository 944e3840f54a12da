"""Gates and losses: fusion, the official router's weight range, layer mapping and pairing, shape errors, which
parameters each loss term trains (the official MAC score trains none of the prompts), and L_MAC's standardised
student scores."""
import math

import pytest
import torch
import torch.nn.functional as F

from cache_schema.manifest import Manifest
from distill.config import PromptConfig
from distill.data import TeacherBank, VisionLayers, stored_vision_layers
from distill.gates import GateSet, MLPGate, NoisyLinearRouter, build_gates
from distill.losses import (LossWeights, agent_layer_map, ce_loss, class_similarity, distill_loss, kd_kl, lac_loss,
                            mac_loss, official_mac_student_score, rel_loss, standardize_scores, student_block_for,
                            vac_loss)
from distill.student import build_student
from pipelines.presets import register_model_configs

NAMES = ["annual crop land", "forest", "sea or lake", "river"]
VISION, LANGUAGE, MULTIMODAL = ["dino", "mae", "sam", "vitdet"], ["gpt3", "vicuna"], ["sd", "pixart", "blip2", "shikra"]
B, C, T, D, LAYERS = 2, len(NAMES), 16, 64, 3
DEPTH_3 = PromptConfig(depth_vision=3, depth_text=3)


@pytest.fixture(scope="module")
def student():
    register_model_configs()
    torch.manual_seed(0)
    return build_student("TransAgent-Tiny-CLIP", pretrained=None, prompts=DEPTH_3, classnames=NAMES)


def gates_for(router="mlp"):
    torch.manual_seed(0)
    return build_gates(router, vision_agents=VISION, vision_dim=D, student_layers=LAYERS,
                       language_agents=LANGUAGE, language_dim=32, multimodal_agents=MULTIMODAL, num_classes=C)


def agent_inputs(seed=0, agent_layers=12):
    g = torch.Generator().manual_seed(seed)
    vision = {n: F.normalize(torch.randn(B, agent_layers, T, D, generator=g), dim=-1).half() for n in VISION}
    language = {n: F.normalize(torch.randn(C, 32, generator=g), dim=-1) for n in LANGUAGE}
    bert = torch.randn(C, 24, generator=g)
    mm = {n: torch.randn(B, C, generator=g) for n in MULTIMODAL}
    mm["sd"] = torch.randn(B, 3, C, generator=g)      # three resolutions
    return vision, language, bert, mm


def forward(student, seed=0):
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 100))
    image_features, tokens = student.encode_image(images)
    text_features = student.encode_text()
    return student.logits(image_features, text_features), text_features, tokens


def prompt_grads(student):
    return {name: (p.grad.abs().sum().item() if p.grad is not None else 0.0)
            for name, p in student.named_prompts().items()}


# ----- gates -----

def test_mlp_gate_is_a_convex_combination_with_gradient():
    torch.manual_seed(0)
    gate = MLPGate(in_dim=6, num_agents=3, hidden=8)
    x = torch.randn(5, 6)
    agents = [torch.randn(5, 4, 2) for _ in range(3)]
    fused, w = gate(x, agents)
    assert w.shape == (5, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    torch.testing.assert_close(fused, sum(w[:, k, None, None] * agents[k] for k in range(3)))
    fused.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())
    assert torch.equal(gate.eval().weights(x), gate.weights(x))       # no noise


@pytest.mark.parametrize("k", [2, 4])
def test_noisy_linear_router_weight_range(k):
    torch.manual_seed(0)
    router = NoisyLinearRouter(in_dim=8, num_agents=k)
    x = 50 * torch.randn(4000, 8)                                      # saturate the inner softmax
    w = router.weights(x)
    low, high = 1 / (math.e + k - 1), math.e / (math.e + k - 1)        # [0.175, 0.475] / [0.269, 0.731]
    assert w.min() >= low - 1e-6 and w.max() <= high + 1e-6
    assert w.min() < low + 0.01 and w.max() > high - 0.01              # the bounds are reached
    assert (round(low, 3), round(high, 3)) == {4: (0.175, 0.475), 2: (0.269, 0.731)}[k]
    router.eval()
    assert not torch.equal(router.weights(x[:8]), router.weights(x[:8]))   # noise at eval too, as official
    agents = [torch.full((8, 3), float(i + 1)) for i in range(k)]
    fused, w = router(x[:8], agents)
    torch.testing.assert_close(fused, sum(w[:, i, None] * agents[i] for i in range(k)) / k)   # mean over agents


def test_build_gates_shapes_and_state_dict():
    gates = gates_for()
    assert isinstance(gates, GateSet) and len(gates.vision) == LAYERS
    assert gates.vision[0].in_dim == 4 * D and gates.language.in_dim == 2 * 32 and gates.multimodal.in_dim == 4 * C
    fresh = build_gates("mlp", vision_agents=VISION, vision_dim=D, student_layers=LAYERS, language_agents=LANGUAGE,
                        language_dim=32, multimodal_agents=MULTIMODAL, num_classes=C)
    fresh.load_state_dict(gates.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), gates.state_dict().values(), strict=True))
    assert gates.describe()["vision_agents"] == VISION
    noisy = gates_for("noisy-linear")
    assert isinstance(noisy.language, NoisyLinearRouter)
    assert build_gates("mlp").language is None and len(build_gates("mlp").vision) == 0


def test_gate_errors():
    with pytest.raises(ValueError, match="unknown router"):
        build_gates("conv")
    with pytest.raises(ValueError, match="num_classes"):
        build_gates(multimodal_agents=["sd"])
    with pytest.raises(ValueError, match="distinct"):
        build_gates(language_agents=["gpt3", "gpt3"], language_dim=4)
    gate = MLPGate(6, 3)
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        gate(torch.randn(2, 5), [torch.randn(2)] * 3)
    with pytest.raises(ValueError, match="3 agents"):
        gate(torch.randn(2, 6), [torch.randn(2)] * 2)
    with pytest.raises(ValueError, match="one shape"):
        gate(torch.randn(2, 6), [torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 4)])


# ----- layer map and shape errors -----

def test_agent_layer_map():
    assert agent_layer_map(12, 12) == list(range(12))
    assert agent_layer_map(3, 12) == [3, 7, 11]
    assert agent_layer_map(12, 24) == [2 * layer + 1 for layer in range(12)]
    assert agent_layer_map(4, 6) == [1, 2, 4, 5]                      # 1.5 -> 2, 4.5 -> 5 (halves round up)
    small = agent_layer_map(12, 3)
    assert small[-1] == 2 and min(small) == 0 and small == sorted(small)
    with pytest.raises(ValueError):
        agent_layer_map(0, 12)


def test_student_block_for_pairs_layers_by_relative_depth():
    assert [student_block_for(a, 12, 12) for a in range(12)] == list(range(12))
    assert [student_block_for(a, 12, 3) for a in (3, 7, 11)] == [0, 1, 2]
    assert [student_block_for(a, 24, 12) for a in (0, 1, 5, 11, 23)] == [0, 0, 2, 5, 11]
    assert [student_block_for(a, 6, 12) for a in range(6)] == [1, 3, 5, 7, 9, 11]
    with pytest.raises(ValueError):
        student_block_for(12, 12, 12)


def vision_manifest(stored=None, count=3, provenance=None, tiny_config=None):
    return Manifest.from_dict({
        "schema_version": 2, "dataset": "eurosat", "agent": "dino", "fingerprint": "0" * 16, "backend": "zarr",
        "status": "complete", "segments": [], "rows": 0, "checksums": {},
        "arrays": {"tokens": {"row_shape": [count, 16, 64], "dtype": "float16"}},
        "fields": {"agent": {"tiny_config": tiny_config}, "family": {"layers": stored}},
        "provenance": provenance or {}}, "manifest.json")


def test_stored_vision_layers_from_the_manifest():
    recorded = {"agent_layers": {"depth": 12, "stored": [3, 7, 11]}}
    assert stored_vision_layers("dino", vision_manifest([3, 7, 11], provenance=recorded)) == (12, (3, 7, 11))
    assert stored_vision_layers("dino", vision_manifest(None, count=12)) == (12, tuple(range(12)))  # old, all
    old_subset = vision_manifest([3, 7, 11])                                 # old, a subset: depth from the spec
    assert stored_vision_layers("dino", old_subset, lambda name, manifest: 12) == (12, (3, 7, 11))
    with pytest.raises(ValueError, match="not the agent's depth"):
        stored_vision_layers("dino", old_subset)
    bad = [(vision_manifest([3, 7]), "2 stored layer numbers for 3"),
           (vision_manifest([3, 7, 11], provenance={"agent_layers": {"depth": 8, "stored": [3, 7, 11]}}), "exceed"),
           (vision_manifest([3, 7, 11], provenance={"agent_layers": {"depth": 12, "stored": [3, 7, 10]}}),
            "fields.family.layers"),
           (vision_manifest([3, 7, 11], provenance={"agent_layers": {"depth": True, "stored": [3, 7, 11]}}),
            "depth must be a positive integer"),
           (vision_manifest([3, "7", 11]), "fields.family.layers must be"),
           (vision_manifest([3, 3, 11]), "distinct"),
           (vision_manifest(None, provenance={"agent_layers": [12]}), "must be an object")]
    for manifest, message in bad:
        with pytest.raises(ValueError, match=message):
            stored_vision_layers("dino", manifest, lambda name, manifest: 12)


def test_layer_pairs_of_a_three_layer_cache_and_of_another_depth():
    """Stored agent layers 3, 7, 11 of 12 pair with student blocks 3, 7, 11 (not blocks 0-4 with layer 3), and
    `--layers` chooses among the stored layers by their extract numbers."""
    three = TeacherBank([], vision_layers={"dino": VisionLayers(12, (3, 7, 11)), "mae": VisionLayers(12, (3, 7, 11))})
    assert three.layer_pairs(12) == [(3, 0, 3), (7, 1, 7), (11, 2, 11)]
    assert three.layer_pairs(12, [11, 7]) == [(7, 1, 7), (11, 2, 11)]
    assert three.layer_pairs(3) == [(3, 0, 0), (7, 1, 1), (11, 2, 2)]
    with pytest.raises(ValueError, match=r"--layers 5: the vision caches store agent layers 3,7,11 \(of 12\)"):
        three.layer_pairs(12, [5])
    deeper = TeacherBank([], vision_layers={"dino": VisionLayers(24, (11, 23, 5))})   # stored in this order
    assert deeper.layer_pairs(12) == [(5, 2, 2), (11, 0, 5), (23, 1, 11)]
    mixed = TeacherBank([], vision_layers={"dino": VisionLayers(12, (3, 7, 11)), "mae": VisionLayers(24, (7, 15, 23))})
    with pytest.raises(ValueError, match="store different agent layers"):
        mixed.layer_pairs(12)
    assert TeacherBank([]).layer_pairs(12) == []
    with pytest.raises(ValueError, match="no vision agent"):
        TeacherBank([]).layer_pairs(12, [3])


def test_vision_agents_have_a_depth_for_caches_that_predate_recording_it():
    from extract.agents import registry
    from pipelines.distillation import agent_spec_depth

    for name, spec in registry().items():
        if spec.family == "vision":
            assert agent_spec_depth(name, vision_manifest(tiny_config=None)) == spec.depth == 12, name
            assert agent_spec_depth(name, vision_manifest(tiny_config=spec.tiny_config)) == 3, name


def test_vac_uses_mapped_agent_layers():
    """A student equal to the agent at the mapped layers has zero L_VAC; any other mapping would not."""
    g = torch.Generator().manual_seed(0)
    agent = F.normalize(torch.randn(B, 12, T, D, generator=g), dim=-1)
    student_tokens = agent[:, [3, 7, 11]].transpose(0, 1)            # [Ls, B, T, D]
    gates = build_gates(vision_agents=["a", "b"], vision_dim=D, student_layers=LAYERS)
    loss, w = vac_loss(student_tokens, [agent, agent.clone()], gates.vision)
    assert loss.item() < 1e-6 and w.shape == (LAYERS, B, 2)
    shifted = agent[:, [2, 6, 10]].transpose(0, 1)
    assert vac_loss(shifted, [agent, agent], gates.vision)[0].item() > 0.01


def test_shape_errors_are_clear():
    gates = gates_for()
    student_tokens = torch.randn(LAYERS, B, T, D)
    wrong_width = [torch.randn(B, 12, T, 32)] * 4
    with pytest.raises(ValueError, match="do not match the student"):
        vac_loss(student_tokens, wrong_width, gates.vision)
    with pytest.raises(ValueError, match="do not match the student"):
        vac_loss(student_tokens, [torch.randn(B, 12, 9, D)] * 4, gates.vision)
    with pytest.raises(ValueError, match="vision gates"):
        vac_loss(student_tokens, [torch.randn(B, 12, T, D)] * 4, gates.vision[:2])
    with pytest.raises(ValueError, match="language agent 0"):
        lac_loss(torch.randn(C, 32), [torch.randn(C + 1, 32)] * 2, gates.language)
    with pytest.raises(ValueError, match="same C"):
        rel_loss(torch.randn(C, 32), torch.randn(C + 1, 8))
    with pytest.raises(ValueError, match="multimodal agent 0"):
        mac_loss(torch.randn(B, C), [torch.randn(B, C + 1)] * 4, gates.multimodal)
    with pytest.raises(ValueError, match=r"built for agents"):
        distill_loss(torch.randn(B, C), torch.zeros(B, dtype=torch.long), gates=gates,
                     text_features=torch.randn(C, 32), language_features={"gpt3": torch.randn(C, 32)})
    with pytest.raises(ValueError, match="no vision gate"):
        distill_loss(torch.randn(B, C), torch.zeros(B, dtype=torch.long), gates=build_gates(),
                     student_tokens=student_tokens, vision_tokens={"dino": torch.randn(B, 12, T, D)})


# ----- formulas -----

def test_formulas_against_manual_values():
    g = torch.Generator().manual_seed(3)
    teacher, student_logits = torch.randn(B, C, generator=g), torch.randn(B, C, generator=g)
    p, log_q = teacher.softmax(-1), student_logits.log_softmax(-1)
    manual = (p * (p.log() - log_q)).sum() / B
    torch.testing.assert_close(kd_kl(teacher, student_logits), manual)
    torch.testing.assert_close(kd_kl(teacher, student_logits, 2.0),
                               4 * kd_kl(teacher / 2, student_logits / 2))
    z = standardize_scores(3 * teacher + 7)                          # affine per image -> same z
    torch.testing.assert_close(z, standardize_scores(teacher))
    torch.testing.assert_close(z.mean(-1), torch.zeros(B), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(-1, unbiased=False), torch.ones(B))
    torch.testing.assert_close(standardize_scores(torch.stack([teacher, teacher + 1], 1)), standardize_scores(teacher))
    features = torch.randn(C, 8, generator=g)
    assert rel_loss(features, 5 * features).item() < 1e-6
    torch.testing.assert_close(class_similarity(features).diagonal(), torch.ones(C))
    gate = MLPGate(2 * 8, 2)
    unit = F.normalize(features, dim=-1)
    assert lac_loss(features, [unit, unit], gate)[0].item() < 1e-6
    labels = torch.tensor([1, 3])
    torch.testing.assert_close(ce_loss(student_logits, labels), F.cross_entropy(student_logits, labels))


def test_lac_renormalisation_choice():
    g = torch.Generator().manual_seed(4)
    a, b = F.normalize(torch.randn(C, 8, generator=g), dim=-1), F.normalize(torch.randn(C, 8, generator=g), dim=-1)
    gate = MLPGate(16, 2)
    fused, _ = gate(torch.cat([a, b], -1), [a, b])
    assert (fused.norm(dim=-1) < 1 - 1e-3).all()                      # convex combination of disagreeing units
    student = F.normalize(fused, dim=-1)
    assert lac_loss(student, [a, b], gate, renormalize=True)[0].item() < 1e-6
    assert lac_loss(student, [a, b], gate, renormalize=False)[0].item() > 1e-3


# ----- gradients -----

@pytest.mark.parametrize("term", ["vac", "lac", "rel", "mac"])
def test_each_agent_term_trains_the_prompts_and_its_gate(student, term):
    student.zero_grad(set_to_none=True)
    gates = gates_for()
    logits, text_features, tokens = forward(student)
    vision, language, bert, mm = agent_inputs()
    if term == "vac":
        loss, _ = vac_loss(tokens, [vision[n] for n in VISION], gates.vision)
        trained, gate = ["visual_ctx", "visual_deep.0", "visual_deep.1"], gates.vision
    elif term == "lac":
        loss, _ = lac_loss(text_features, [language[n] for n in LANGUAGE], gates.language)
        trained, gate = ["text_ctx", "text_deep.0", "text_deep.1"], gates.language
    elif term == "rel":
        loss, gate = rel_loss(text_features, bert), None
        trained = ["text_ctx", "text_deep.0", "text_deep.1"]
    else:
        loss, _ = mac_loss(logits, [mm[n] for n in MULTIMODAL], gates.multimodal)
        trained, gate = list(student.named_prompts()), gates.multimodal
    loss.backward()
    grads = prompt_grads(student)
    assert all(grads[name] > 0 for name in trained), grads
    if gate is not None:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())


def test_official_mac_score_gives_the_prompts_no_gradient(student):
    student.zero_grad(set_to_none=True)
    gates = gates_for("noisy-linear")
    clip = student.clip
    score = official_mac_student_score(student.text_deep[-1], student.visual_deep[-1], clip.ln_final,
                                       clip.text_projection, clip.visual.ln_post, clip.visual.proj,
                                       clip.logit_scale.exp(), batch_size=B, num_classes=C)
    assert score.shape == (B, C) and torch.unique(score).numel() == 1
    _, _, mm = agent_inputs()[1:]
    loss, w = mac_loss(score, [mm[n] for n in MULTIMODAL], gates.multimodal, student="logits")  # official: raw S
    loss.backward()
    official = prompt_grads(student)
    assert all(g == 0.0 for name, g in official.items() if name not in ("text_deep.1", "visual_deep.1"))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.multimodal.route.parameters())
    # the same agents with the student's class logits do train the prompts; the official score only leaves
    # float rounding (reference §12.3 check 2: below 1e-3 of a real gradient)
    student.zero_grad(set_to_none=True)
    logits, _, _ = forward(student)
    mac_loss(logits, [mm[n] for n in MULTIMODAL], gates.multimodal)[0].backward()
    ours = prompt_grads(student)
    for name in ("text_deep.1", "visual_deep.1"):
        assert official[name] < 1e-3 * ours[name], (official, ours)


def test_distill_loss_combines_terms(student):
    student.zero_grad(set_to_none=True)
    gates = gates_for()
    logits, text_features, tokens = forward(student)
    vision, language, bert, mm = agent_inputs()
    labels = torch.tensor([0, 2])
    weights = LossWeights(vac=1.0, lac=25.0, rel=1.0, mac=1.0)
    total, terms = distill_loss(logits, labels, gates=gates, weights=weights, student_tokens=tokens,
                                vision_tokens=vision, text_features=text_features, language_features=language,
                                bert_features=bert, mm_scores=mm)
    assert {"ce", "vac", "lac", "rel", "mac", "total"} <= set(terms)
    assert all(isinstance(v, float) for v in terms.values())
    expected = terms["ce"] + terms["vac"] + 25 * terms["lac"] + terms["rel"] + terms["mac"]
    assert math.isclose(terms["total"], expected, rel_tol=1e-5) and math.isclose(total.item(), expected, rel_tol=1e-5)
    for modality, names in (("vision", VISION), ("language", LANGUAGE), ("multimodal", MULTIMODAL)):
        shares = [terms[f"gate/{modality}/{n}"] for n in names]
        assert math.isclose(sum(shares), 1.0, rel_tol=1e-5)
    total.backward()
    assert all(g > 0 for g in prompt_grads(student).values())
    # cached token means give the same gate inputs; a zero lambda skips its term; CE alone needs no agents
    means = {n: x.float().mean(dim=2) for n, x in vision.items()}
    _, again = distill_loss(logits.detach(), labels, gates=gates, student_tokens=tokens.detach(),
                            vision_tokens=vision, vision_token_means=means)
    assert math.isclose(again["vac"], terms["vac"], rel_tol=1e-4)
    _, partial = distill_loss(logits.detach(), labels, gates=gates, weights=LossWeights(lac=0.0),
                              text_features=text_features.detach(), language_features=language)
    assert "lac" not in partial and set(partial) == {"ce", "total"}
    ce_only, only = distill_loss(logits.detach(), labels)
    assert set(only) == {"ce", "total"} and math.isclose(ce_only.item(), terms["ce"], rel_tol=1e-6)


def test_vac_sums_the_given_layer_pairs():
    torch.manual_seed(0)
    student = torch.nn.functional.normalize(torch.randn(3, 2, 4, 8), dim=-1)
    agents = [torch.nn.functional.normalize(torch.randn(2, 3, 4, 8), dim=-1) for _ in range(2)]
    gates = build_gates("mlp", vision_agents=["a", "b"], vision_dim=8, student_layers=3).vision
    every, _ = vac_loss(student, agents, gates)
    parts = [vac_loss(student, agents, gates, pairs=[(layer, layer)])[0] for layer in range(3)]
    subset, weights = vac_loss(student, agents, gates, pairs=[(0, 0), (2, 2)])
    assert torch.allclose(every, sum(parts)) and torch.allclose(subset, parts[0] + parts[2])
    assert weights.shape[0] == 2
    crossed, _ = vac_loss(student, agents, gates, pairs=[(2, 0)])       # cached layer 0 onto student block 2
    target = F.normalize(gates[2](torch.cat([a[:, 0].mean(1) for a in agents], -1), [a[:, 0] for a in agents])[0],
                         dim=-1)
    torch.testing.assert_close(crossed, F.l1_loss(student[2], target))
    with pytest.raises(ValueError, match="student layer within 0..2"):
        vac_loss(student, agents, gates, pairs=[(3, 0)])
    with pytest.raises(ValueError, match="cached agent layer within 0..2"):
        vac_loss(student, agents, gates, pairs=[(0, 3)])


# ----- L_MAC: standardised student scores -----

def mac_inputs(seed=0, batch=4, classes=10, spread=5.0):
    g = torch.Generator().manual_seed(seed)
    logits = (spread * torch.randn(batch, classes, generator=g) + 20).requires_grad_(True)
    agents = [torch.randn(batch, classes, generator=g) for _ in range(4)]
    torch.manual_seed(seed)
    return logits, agents, build_gates(multimodal_agents=MULTIMODAL, num_classes=classes).multimodal


def test_mac_does_not_depend_on_the_scale_of_the_student_logits():
    logits, agents, gate = mac_inputs()
    losses = [mac_loss(scale * logits + shift, agents, gate)[0].item() for scale, shift in ((1, 0), (0.05, 0),
                                                                                              (30, 0), (2, -7))]
    assert all(math.isclose(loss, losses[0], rel_tol=1e-5) for loss in losses), losses
    raw = [mac_loss(scale * logits, agents, gate, student="logits")[0].item() for scale in (1, 0.05, 30)]
    assert max(raw) > 2 * min(raw)                                  # the raw form measures the logits' spread


def test_mac_gradient_cannot_change_the_spread_of_the_logits():
    """The gradient is orthogonal to the centred logits (and to a constant shift), so L_MAC reorders classes and
    leaves the student's confidence to CE; the raw-logit form pulls a confident student's spread down."""
    logits, agents, gate = mac_inputs(spread=5.0)
    mac_loss(logits, agents, gate)[0].backward()
    centred = (logits - logits.mean(-1, keepdim=True)).detach()
    cosine = (logits.grad * centred).sum(-1) / (logits.grad.norm(dim=-1) * centred.norm(dim=-1))
    assert cosine.abs().max() < 1e-5 and logits.grad.abs().max() > 1e-4, cosine
    torch.testing.assert_close(logits.grad.sum(-1), torch.zeros(len(logits)), atol=1e-7, rtol=0)
    logits.grad = None
    mac_loss(logits, agents, gate, student="logits")[0].backward()
    assert ((logits.grad * centred).sum(-1) > 0).all()             # descent shrinks every image's spread


def test_mac_is_zero_when_the_fused_teacher_equals_the_student():
    logits, _, gate = mac_inputs()
    agents = [3 * logits.detach() + 1, 0.5 * logits.detach() - 4, logits.detach(), 7 * logits.detach()]
    loss, _ = mac_loss(logits, agents, gate)
    assert abs(loss.item()) < 1e-6
    assert mac_loss(logits, agents, gate, student="logits")[0].item() > 0.1


def test_flat_scores_are_not_amplified_into_a_signal():
    """Scores equal up to float rounding standardise to 0 (not to unit-size noise), and a flat student row drops
    that image's term with a zero, finite gradient."""
    rounding = torch.full((1, C), 1000.0)
    rounding[0, ::2] = torch.nextafter(rounding[0, ::2], torch.tensor(2000.0))   # one ulp apart
    assert torch.equal(standardize_scores(rounding), torch.zeros(1, C))
    assert torch.equal(standardize_scores(torch.zeros(2, C)), torch.zeros(2, C))
    logits, agents, gate = mac_inputs(batch=2, classes=C)
    flat = torch.cat([torch.full((1, C), 12.5), logits[1:].detach()]).requires_grad_(True)
    loss, _ = mac_loss(flat, [a[:2] for a in agents], gate)
    loss.backward()
    assert torch.isfinite(flat.grad).all() and torch.equal(flat.grad[0], torch.zeros(C))
    alone, _ = mac_loss(flat[1:], [a[1:2] for a in agents], gate)
    torch.testing.assert_close(loss, alone / 2)                     # the flat image contributes 0 to batchmean
    flat_agents = [torch.full((2, C), 3.0)] * 4                      # no agent has an opinion: no term
    assert mac_loss(logits[:2], flat_agents, gate)[0].item() == 0.0


def test_mac_prompt_gradient_is_comparable_to_ce_at_initialisation():
    """Realistic batches: 10 classes, batch 4, logits with zero-shot CLIP's per-image spread (100·cos spreads by
    about 2), the student right on 3 of 4 images, agents that share a view of the label. L_MAC at λ = 1 must
    neither drown CE nor vanish beside it (over seeds a single batch gives 0.09-0.34)."""
    classes, batch, batches = 10, 4, 3
    register_model_configs()
    torch.manual_seed(1)
    model = build_student("TransAgent-Tiny-CLIP", pretrained=None, prompts=DEPTH_3,
                          classnames=[f"class {i}" for i in range(classes)])
    gate = build_gates(multimodal_agents=MULTIMODAL, num_classes=classes).multimodal
    prompts = list(model.trainable_parameters())
    g = torch.Generator().manual_seed(11)
    features, _ = model.encode_image(torch.randn(batches * batch, 3, 32, 32, generator=g), return_tokens=False)
    cosines = F.normalize(features, dim=-1) @ F.normalize(model.encode_text(), dim=-1).T
    # the tiny tower's random cosines spread wider than CLIP's: scale them to CLIP's per-image logit spread
    logits = 2.0 / cosines.detach().std(-1, unbiased=False).mean() * cosines
    ce_norm = mac_norm = 0.0
    for rows in logits.split(batch):
        ranked = rows.detach().argsort(-1, descending=True)
        labels = torch.cat([ranked[:3, 0], ranked[3:, 1]])
        shared = 2 * F.one_hot(labels, classes).float() + torch.randn(batch, classes, generator=g)
        agents = [shared + torch.randn(batch, classes, generator=g) for _ in MULTIMODAL]
        ce, mac = [math.sqrt(sum(grad.square().sum().item() for grad in torch.autograd.grad(
                       loss, prompts, retain_graph=True, allow_unused=True) if grad is not None))
                   for loss in (ce_loss(rows, labels), mac_loss(rows, agents, gate)[0])]
        ce_norm, mac_norm = ce_norm + ce, mac_norm + mac
    assert 0.1 <= mac_norm / ce_norm <= 10, (mac_norm, ce_norm)
