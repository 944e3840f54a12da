"""Stage-2 losses (DESIGN §6, reference §6). Pure functions of tensors (and the gates that fuse the agents).

    L = CE + λ_VAC·L_VAC + λ_LAC·L_LAC + λ_REL·L_REL + λ_MAC·L_MAC   (λ and T: `distill.config.LossWeights`)

Choices (the README repeats them):

* L_VAC: sum over (student layer, agent layer) pairs (not mean, as official) of L1(student tokens,
  normalise(gated agent tokens)). Stage 2 pairs every stored agent layer with the student block of the same
  relative depth (`student_block_for`: the same block when depths are equal); without explicit pairs, tokens of
  every agent layer are mapped per student layer by `agent_layer_map`.
* L_LAC: the gated language target is re-normalised by default. With the MLP gate the target is a convex
  combination of unit class features, so its norm is below 1 wherever gpt3 and vicuna disagree, and a unit-norm
  student can never reach it; re-normalising keeps the target on the student's sphere, as L_VAC does.
  `renormalize_language=False` gives the official form (which, with its mean over agents, has norm <= 0.5).
* L_REL: L1 between the cosine class-similarity matrices of the student text features and of the bert class
  features, each in its own space, so no projection is needed.
* L_MAC: T²·KL(softmax(S_A/T) || softmax(S_P/T)) with `batchmean` reduction (sum over classes, mean over
  images: the KL per image, averaged), where S_A = Σ_k w_k z_k, z_k = each agent's scores standardised per image
  across classes, and S_P = the student's class logits standardised the same way (population std, σ not
  detached), as logit-standardised distillation does (Sun et al., CVPR 2024). Raw logits (100·cos) against
  z-scores compare unlike scales: at T = 1 the KL then mostly measures the student's logit spread and its gradient
  shrinks that spread, against CE. Standardised, the term is invariant to the logits' scale and its gradient is
  orthogonal to the centred logits, so it shapes the ranking and leaves confidence to CE. `mac_student="logits"`
  keeps raw logits. A score vector whose spread is at rounding level is not standardised (that would amplify
  rounding into a full-size signal): an agent's gives z = 0, a student's (or all agents' at once) drops the
  image's term, with no gradient. The official code divided the summed KL by B·C instead and used a
  class-independent student score that gives the prompts no gradient: `official_mac_student_score` reproduces
  that score so a test can show it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from distill.config import MAC_STUDENT_FORMS, LossWeights

# ----- CE -----


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the student's logits [B, C] (logit_scale·cos)."""
    return F.cross_entropy(logits.float(), labels)


# ----- vision: L_VAC -----


def agent_layer_map(student_layers: int, agent_layers: int) -> list[int]:
    """0-based agent layer for each student layer: round((l+1)·La/Ls) − 1, rounding halves up, clamped at 0.

    Equal counts give the identity; 3 student layers over 12 agent layers give [3, 7, 11].
    """
    if student_layers < 1 or agent_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got student {student_layers}, agent {agent_layers}")
    # floor(x + 1/2) in integers: x = (s+1)·La/Ls
    return [max(0, (2 * (s + 1) * agent_layers + student_layers) // (2 * student_layers) - 1)
            for s in range(student_layers)]


def student_block_for(agent_layer: int, agent_depth: int, student_depth: int) -> int:
    """0-based student block at the relative depth of a 0-based agent layer: round((a+1)·Ls/La) − 1, rounding
    halves up, clamped at 0. Equal depths give the same block; agent layer 23 of 24 pairs with block 11 of 12."""
    if student_depth < 1 or agent_depth < 1 or not 0 <= agent_layer < agent_depth:
        raise ValueError(f"agent layer {agent_layer} of depth {agent_depth}, student depth {student_depth}")
    return max(0, (2 * (agent_layer + 1) * student_depth + agent_depth) // (2 * agent_depth) - 1)


def vac_loss(student_tokens: torch.Tensor, agent_tokens: Sequence[torch.Tensor], gates: Sequence,
             agent_token_means: Sequence[torch.Tensor] | None = None,
             pairs: Sequence[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over (student layer s, agent index a) pairs of L1(student tokens of s, normalise(gated agent tokens a)).

    student_tokens: [Ls, B, T, D], L2-normalised per token (Student.encode_image).
    agent_tokens: K tensors [B, La, T, D] (the cached, normalised agent tokens; all agents share La).
    gates: Ls gates, one per student layer (GateSet.vision); a pair uses its student layer's gate.
    agent_token_means: K tensors [B, La, D], the gate inputs; computed from agent_tokens when None.
    pairs: (student layer, index into the La cached layers); default: every student layer with
    `agent_layer_map(Ls, La)`, i.e. the tokens hold every layer of the agent.
    Returns (loss, weights [len(pairs), B, K]).
    """
    if student_tokens.dim() != 4:
        raise ValueError(f"student tokens must be [layers, B, T, D], got {tuple(student_tokens.shape)}")
    num_layers, batch, tokens, dim = student_tokens.shape
    if len(gates) != num_layers:
        raise ValueError(f"{len(gates)} vision gates for {num_layers} student layers")
    if not agent_tokens:
        raise ValueError("L_VAC needs at least one vision agent")
    agent_layers = agent_tokens[0].shape[1] if agent_tokens[0].dim() == 4 else None
    for k, x in enumerate(agent_tokens):
        if x.dim() != 4 or x.shape[0] != batch or tuple(x.shape[2:]) != (tokens, dim) or x.shape[1] != agent_layers:
            raise ValueError(f"vision agent {k} tokens {tuple(x.shape)} do not match the student: expected "
                             f"[B={batch}, La, T={tokens}, D={dim}] with one La for all agents "
                             f"(student tokens {tuple(student_tokens.shape)}); extract agents on the student's "
                             "grid and width")
    if agent_token_means is None:
        agent_token_means = [x.mean(dim=2) for x in agent_tokens]
    elif len(agent_token_means) != len(agent_tokens):
        raise ValueError(f"{len(agent_token_means)} token-mean arrays for {len(agent_tokens)} vision agents")

    total, weights = student_tokens.new_zeros((), dtype=torch.float32), []
    if pairs is None:
        pairs = list(enumerate(agent_layer_map(num_layers, agent_layers)))
    pairs = [(int(layer), int(agent_layer)) for layer, agent_layer in pairs]
    bad = [p for p in pairs if not (0 <= p[0] < num_layers and 0 <= p[1] < agent_layers)]
    if not pairs or bad:
        raise ValueError(f"L_VAC layer pairs {bad or pairs} must be (student layer within 0..{num_layers - 1}, "
                         f"cached agent layer within 0..{agent_layers - 1})")
    for layer, agent_layer in pairs:
        gate_input = torch.cat([m[:, agent_layer] for m in agent_token_means], dim=-1)
        fused, w = gates[layer](gate_input, [x[:, agent_layer] for x in agent_tokens])
        target = F.normalize(fused.float(), dim=-1)
        total = total + F.l1_loss(student_tokens[layer].float(), target)
        weights.append(w)
    return total, torch.stack(weights)


# ----- language: L_LAC and L_REL -----


def lac_loss(text_features: torch.Tensor, agent_features: Sequence[torch.Tensor], gate,
             renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """L1(normalised student text features [C, E], gated language-agent class features [C, E]).

    agent_features: K tensors [C, E] in the student's text space (gpt3, vicuna: CLIP text features); each is
    L2-normalised here (a no-op for the cache's unit vectors). Returns (loss, weights [C, K]).
    """
    student = F.normalize(text_features.float(), dim=-1)
    if not agent_features:
        raise ValueError("L_LAC needs at least one language agent")
    for k, x in enumerate(agent_features):
        if tuple(x.shape) != tuple(student.shape):
            raise ValueError(f"language agent {k} features {tuple(x.shape)} != student text features "
                             f"{tuple(student.shape)} (same classes, same text space expected)")
    agents = [F.normalize(x.float(), dim=-1) for x in agent_features]
    fused, weights = gate(torch.cat(agents, dim=-1), agents)
    target = F.normalize(fused, dim=-1) if renormalize else fused
    return F.l1_loss(student, target), weights


def class_similarity(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix [C, C] of class features [C, D]."""
    features = F.normalize(features.float(), dim=-1)
    return features @ features.T


def rel_loss(text_features: torch.Tensor, bert_features: torch.Tensor) -> torch.Tensor:
    """L1(student class-similarity matrix, bert class-similarity matrix); each in its own feature space."""
    if text_features.dim() != 2 or bert_features.dim() != 2 or text_features.shape[0] != bert_features.shape[0]:
        raise ValueError(f"L_REL needs [C, D] student and [C, d] bert class features with the same C, got "
                         f"{tuple(text_features.shape)} and {tuple(bert_features.shape)}")
    return F.l1_loss(class_similarity(text_features), class_similarity(bert_features))


# ----- multi-modal: L_MAC -----


FLAT_SCORES_EPS = 1e-5   # relative: a std <= eps·max|score| is float rounding of a constant vector, not a signal


def standardize_scores(scores: torch.Tensor, eps: float = FLAT_SCORES_EPS) -> torch.Tensor:
    """Per-image scores standardised across classes (mean 0, population std 1). [B, C], or [B, R, C] (R resolutions
    of a t2i agent, averaged first as the official code did). A row whose std is at most eps·max|row| (a constant
    vector up to rounding) becomes 0 rather than amplified rounding; its gradient is 0, never NaN."""
    if scores.dim() == 3:
        scores = scores.float().mean(dim=1)
    if scores.dim() != 2:
        raise ValueError(f"agent scores must be [B, C] or [B, R, C], got {tuple(scores.shape)}")
    return _standardize(scores, eps)[0]


def _standardize(scores: torch.Tensor, eps: float = FLAT_SCORES_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(z [B, C], varying [B, 1]): z-scores with σ not detached; flat rows give z = 0 and varying = False."""
    scores = scores.float()
    centred = scores - scores.mean(dim=-1, keepdim=True)
    variance = centred.square().mean(dim=-1, keepdim=True)
    scale = scores.detach().abs().amax(dim=-1, keepdim=True)
    varying = variance.detach() > (eps * scale).square()
    # sqrt only of the rows that vary: sqrt'(0) = inf would turn the masked rows' zero gradient into NaN
    std = torch.where(varying, variance, torch.ones_like(variance)).sqrt()
    return torch.where(varying, centred / std, torch.zeros_like(centred)), varying


def kd_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) || softmax(student/T)), summed over classes, averaged over rows (batchmean)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1),
                    F.log_softmax(teacher_logits.float() / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


def mac_loss(student_logits: torch.Tensor, agent_scores: Sequence[torch.Tensor], gate,
             temperature: float = LossWeights.temperature,
             student: str = LossWeights.mac_student) -> tuple[torch.Tensor, torch.Tensor]:
    """T²·KL(softmax(S_A/T) || softmax(S_P/T)); S_A = Σ_k w_k z_k from the standardised agent scores z_k.

    student_logits: [B, C] (the same logits CE uses); S_P is them standardised per image (student="standardized")
    or as they are (student="logits"). agent_scores: K tensors [B, C] or [B, R, C]. gate: the multimodal gate
    (input = concat of the z_k, [B, K·C]). Returns (loss, weights [B, K]).
    """
    if student not in MAC_STUDENT_FORMS:
        raise ValueError(f"mac student form must be one of {MAC_STUDENT_FORMS}, got {student!r}")
    if student_logits.dim() != 2:
        raise ValueError(f"student logits must be [B, C], got {tuple(student_logits.shape)}")
    if not agent_scores:
        raise ValueError("L_MAC needs at least one multimodal agent")
    standardized = []
    for k, scores in enumerate(agent_scores):
        if scores.dim() == 3:
            scores = scores.float().mean(dim=1)
        if tuple(scores.shape) != tuple(student_logits.shape):
            raise ValueError(f"multimodal agent {k} scores {tuple(agent_scores[k].shape)} do not match the "
                             f"student logits {tuple(student_logits.shape)} (same images, same class set)")
        standardized.append(_standardize(scores))
    z = [zk for zk, _ in standardized]
    teacher, weights = gate(torch.cat(z, dim=-1), z)
    if student == "logits":
        return kd_kl(teacher, student_logits, temperature), weights
    student_z, varying = _standardize(student_logits)
    varying = varying & torch.stack([v for _, v in standardized]).any(dim=0)
    t = temperature
    per_image = F.kl_div(F.log_softmax(student_z / t, dim=-1), F.log_softmax(teacher.float() / t, dim=-1),
                         reduction="none", log_target=True).sum(dim=-1, keepdim=True)
    return torch.where(varying, per_image, torch.zeros_like(per_image)).mean() * (t * t), weights


def official_mac_student_score(text_prompt: torch.Tensor, vision_prompt: torch.Tensor, ln_final, text_projection,
                               ln_post, visual_proj, logit_scale: torch.Tensor | float, batch_size: int,
                               num_classes: int) -> torch.Tensor:
    """The official MAC student score [B, C] (reference §6.3): the last deep text / vision prompts [n_ctx, W]
    through the frozen final norms and projections, logit_scale·cos per context position, mean over positions,
    broadcast to every image and class. It is one scalar, so softmax(S) is uniform and KL gives the prompts no
    gradient."""
    t = ln_final(text_prompt)
    t = text_projection(t) if isinstance(text_projection, torch.nn.Module) else t @ text_projection
    v = ln_post(vision_prompt) @ visual_proj
    score = (logit_scale * (F.normalize(v, dim=-1) * F.normalize(t, dim=-1)).sum(dim=-1)).mean()
    return score.reshape(1, 1).expand(batch_size, num_classes)


# ----- everything together -----


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, *, gates=None, weights: LossWeights | None = None,
                 student_tokens: torch.Tensor | None = None,
                 vision_tokens: Mapping[str, torch.Tensor] | None = None,
                 vision_token_means: Mapping[str, torch.Tensor] | None = None,
                 text_features: torch.Tensor | None = None,
                 language_features: Mapping[str, torch.Tensor] | None = None,
                 bert_features: torch.Tensor | None = None,
                 mm_scores: Mapping[str, torch.Tensor] | None = None,
                 vision_pairs: Sequence[tuple[int, int]] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + the weighted agent terms whose inputs are given and whose λ is non-zero.

    vision_pairs: L_VAC's (student layer, cached agent layer index) pairs (vac_loss's default when None).

    Agent inputs are keyed by agent name and fused in the gate set's agent order. Returns the total (a tensor to
    backpropagate) and a dict of floats for logging: every computed term ("ce", "vac", "lac", "rel", "mac",
    "total", unweighted except "total") and the mean gate weight per agent ("gate/<modality>/<agent>").
    """
    weights = weights or LossWeights()
    terms = {"ce": ce_loss(logits, labels)}
    total = terms["ce"]
    gate_weights: dict[str, torch.Tensor] = {}

    def ordered(inputs: Mapping[str, torch.Tensor], names: Sequence[str], modality: str) -> list[torch.Tensor]:
        missing = [n for n in names if n not in inputs]
        if missing or len(inputs) != len(names):
            raise ValueError(f"{modality} gates were built for agents {list(names)}, got inputs for "
                             f"{sorted(inputs)}")
        return [inputs[n] for n in names]

    def record(modality: str, names: Sequence[str], w: torch.Tensor) -> None:
        per_agent = w.detach().float().reshape(-1, len(names)).mean(dim=0)
        for name, value in zip(names, per_agent, strict=True):
            gate_weights[f"gate/{modality}/{name}"] = value

    if vision_tokens and weights.vac:
        if student_tokens is None:
            raise ValueError("L_VAC needs student_tokens (Student.encode_image(..., return_tokens=True))")
        names = _require_gates(gates, "vision").vision_agents
        means = ordered(vision_token_means, names, "vision") if vision_token_means is not None else None
        terms["vac"], w = vac_loss(student_tokens, ordered(vision_tokens, names, "vision"), gates.vision, means,
                                   vision_pairs)
        total = total + weights.vac * terms["vac"]
        record("vision", names, w)
    if language_features and weights.lac:
        _require_text(text_features, "L_LAC")
        names = _require_gates(gates, "language").language_agents
        terms["lac"], w = lac_loss(text_features, ordered(language_features, names, "language"), gates.language,
                                   renormalize=weights.renormalize_language)
        total = total + weights.lac * terms["lac"]
        record("language", names, w)
    if bert_features is not None and weights.rel:
        _require_text(text_features, "L_REL")
        terms["rel"] = rel_loss(text_features, bert_features)
        total = total + weights.rel * terms["rel"]
    if mm_scores and weights.mac:
        names = _require_gates(gates, "multimodal").multimodal_agents
        terms["mac"], w = mac_loss(logits, ordered(mm_scores, names, "multimodal"), gates.multimodal,
                                   weights.temperature, weights.mac_student)
        total = total + weights.mac * terms["mac"]
        record("multimodal", names, w)

    terms["total"] = total
    logged = {**terms, **gate_weights}
    values = torch.stack([v.detach().float().reshape(()) for v in logged.values()]).tolist()  # one device sync
    return total, dict(zip(logged, values, strict=True))


def _require_gates(gates, modality: str):
    has = {"vision": lambda g: len(g.vision) > 0, "language": lambda g: g.language is not None,
           "multimodal": lambda g: g.multimodal is not None}[modality]
    if gates is None or not has(gates):
        raise ValueError(f"{modality} agent inputs were given but there is no {modality} gate "
                         "(build_gates(..., " + f"{modality}_agents=[...]))")
    return gates


def _require_text(text_features, term: str) -> None:
    if text_features is None:
        raise ValueError(f"{term} needs the student's text_features (Student.encode_text)")
