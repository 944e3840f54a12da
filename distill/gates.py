"""Mixture-of-Agents gates (DESIGN §6, reference §5).

A gate maps a per-sample summary of K agents' outputs to K weights and fuses the agents' outputs with them:

    fused, weights = gate(gate_input [N, in_dim], agent_outputs: K tensors [N, ...])

Two routers share that interface:

* `MLPGate` (default, "mlp"): Linear -> GELU -> Linear -> softmax over agents; fused = sum_k w_k X_k. No noise.
* `NoisyLinearRouter` ("noisy-linear"): the official router reproduced for comparison: logits and a learned
  noise scale from two parallel linears, noise added at train AND eval, top-k with k = K (no sparsity), softmax,
  then the official caller's second softmax and MEAN over agents (fused = (1/K) sum_k w_k X_k). The double
  softmax confines each weight to [1/(e+K-1), e/(e+K-1)] ([0.175, 0.475] for K=4).

`GateSet` holds the gates of the three modalities; `build_gates` makes one from the agent lists.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.config import ROUTERS, GateConfig


class _Gate(nn.Module):
    """Shared checks and fusion. Subclasses implement `weights(gate_input) -> [N, K]`."""

    fuse_mean = False   # official router averages over agents instead of summing

    def __init__(self, in_dim: int, num_agents: int):
        super().__init__()
        if in_dim < 1 or num_agents < 1:
            raise ValueError(f"a gate needs in_dim >= 1 and num_agents >= 1, got {in_dim}, {num_agents}")
        self.in_dim = in_dim
        self.num_agents = num_agents

    def _check_input(self, gate_input: torch.Tensor) -> torch.Tensor:
        if gate_input.dim() != 2 or gate_input.shape[1] != self.in_dim:
            raise ValueError(f"gate input must be [N, {self.in_dim}] (concatenation over {self.num_agents} agents), "
                             f"got {tuple(gate_input.shape)}")
        return gate_input.to(self._param_dtype())

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def fuse(self, weights: torch.Tensor, agent_outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """sum_k w[:, k] * X_k (divided by K for the official router); X_k are [N, ...] with equal shapes."""
        if len(agent_outputs) != self.num_agents:
            raise ValueError(f"gate has {self.num_agents} agents, got {len(agent_outputs)} outputs")
        shape = tuple(agent_outputs[0].shape)
        if shape[0] != weights.shape[0]:
            raise ValueError(f"agent outputs have {shape[0]} rows but the gate input had {weights.shape[0]}")
        fused = None
        for k, x in enumerate(agent_outputs):
            if tuple(x.shape) != shape:
                raise ValueError(f"agent outputs must share one shape: {shape} vs {tuple(x.shape)} (agent {k})")
            term = weights[:, k].reshape(-1, *([1] * (x.dim() - 1))) * x
            fused = term if fused is None else fused + term
        return fused / self.num_agents if self.fuse_mean else fused

    def forward(self, gate_input: torch.Tensor, agent_outputs: Sequence[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (fused [N, ...], weights [N, K])."""
        weights = self.weights(gate_input)
        return self.fuse(weights, agent_outputs), weights


class MLPGate(_Gate):
    """Linear -> GELU -> Linear -> softmax over agents (DESIGN §6)."""

    def __init__(self, in_dim: int, num_agents: int, hidden: int = GateConfig.hidden):
        super().__init__(in_dim, num_agents)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_agents))

    def weights(self, gate_input: torch.Tensor) -> torch.Tensor:
        return self.net(self._check_input(gate_input)).float().softmax(dim=-1)


class NoisyLinearRouter(_Gate):
    """The official `NoisyTopkRouter` + its caller's second softmax and mean over agents (reference §5.1)."""

    fuse_mean = True

    def __init__(self, in_dim: int, num_agents: int, top_k: int | None = None):
        super().__init__(in_dim, num_agents)
        self.top_k = num_agents if top_k is None else top_k
        if not 1 <= self.top_k <= num_agents:
            raise ValueError(f"top_k must be in [1, {num_agents}], got {self.top_k}")
        self.route = nn.Linear(in_dim, num_agents)
        self.noise = nn.Linear(in_dim, num_agents)

    def weights(self, gate_input: torch.Tensor) -> torch.Tensor:
        x = self._check_input(gate_input)
        logits = self.route(x).float()
        noisy = logits + torch.randn_like(logits) * F.softplus(self.noise(x).float())  # train and eval, as official
        top, indices = noisy.topk(self.top_k, dim=-1)
        sparse = torch.full_like(noisy, float("-inf")).scatter(-1, indices, top)
        router_probs = sparse.softmax(dim=-1)
        return router_probs.softmax(dim=-1)   # the official caller's second softmax


def make_gate(router: str, in_dim: int, num_agents: int, hidden: int = GateConfig.hidden) -> _Gate:
    if router == "mlp":
        return MLPGate(in_dim, num_agents, hidden)
    if router == "noisy-linear":
        return NoisyLinearRouter(in_dim, num_agents)
    raise ValueError(f"unknown router {router!r}; choose from {', '.join(ROUTERS)}")


class GateSet(nn.Module):
    """All gates of a run. Agent order is part of the contract: inputs are concatenated in this order.

    vision: one gate per student layer, input = concat over agents of that layer's token means [B, K*D].
    language: one gate, input per class = concat of the agents' class features [C, K*D].
    multimodal: one gate, input per image = concat of the agents' standardised score vectors [B, K*C].
    A modality without agents has no gate (None / empty).
    """

    def __init__(self, router: str, vision: Sequence[_Gate], language: _Gate | None, multimodal: _Gate | None,
                 vision_agents: Sequence[str] = (), language_agents: Sequence[str] = (),
                 multimodal_agents: Sequence[str] = ()):
        super().__init__()
        self.router = router
        self.vision = nn.ModuleList(vision)
        self.language = language
        self.multimodal = multimodal
        self.vision_agents = tuple(vision_agents)
        self.language_agents = tuple(language_agents)
        self.multimodal_agents = tuple(multimodal_agents)

    def describe(self) -> dict:
        """What a checkpoint's gates were built for (store it with the state dict; compare before loading)."""
        return {"router": self.router, "vision_agents": list(self.vision_agents), "vision_layers": len(self.vision),
                "language_agents": list(self.language_agents), "multimodal_agents": list(self.multimodal_agents),
                "multimodal_in_dim": self.multimodal.in_dim if self.multimodal is not None else None}


def build_gates(router: str = GateConfig.router, *, vision_agents: Sequence[str] = (), vision_dim: int | None = None,
                student_layers: int | None = None, language_agents: Sequence[str] = (),
                language_dim: int | None = None, multimodal_agents: Sequence[str] = (),
                num_classes: int | None = None, hidden: int = GateConfig.hidden) -> GateSet:
    """Gates for the given agents. vision_dim = token width D; language_dim = class-feature width;
    num_classes = the training class count C (the multimodal gate reads K*C scores)."""
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; choose from {', '.join(ROUTERS)}")
    for modality, names in (("vision", vision_agents), ("language", language_agents),
                            ("multimodal", multimodal_agents)):
        if isinstance(names, str) or len(set(names)) != len(names):
            raise ValueError(f"{modality}_agents must be a list of distinct names, got {names!r}")

    def required(value, name, modality):
        if value is None or value < 1:
            raise ValueError(f"{name} (>= 1) is required when {modality} agents are given")
        return value

    vision = []
    if vision_agents:
        dim = required(vision_dim, "vision_dim", "vision")
        layers = required(student_layers, "student_layers", "vision")
        vision = [make_gate(router, len(vision_agents) * dim, len(vision_agents), hidden) for _ in range(layers)]
    language = None
    if language_agents:
        dim = required(language_dim, "language_dim", "language")
        language = make_gate(router, len(language_agents) * dim, len(language_agents), hidden)
    multimodal = None
    if multimodal_agents:
        classes = required(num_classes, "num_classes", "multimodal")
        multimodal = make_gate(router, len(multimodal_agents) * classes, len(multimodal_agents), hidden)
    return GateSet(router, vision, language, multimodal, vision_agents, language_agents, multimodal_agents)
