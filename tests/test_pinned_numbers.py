"""Numbers pinned against hand computations and golden values, not against the code that makes them: ViT token
grids, L_VAC, the L_LAC default, the learning-rate schedule, the view distribution, apply_view's crop box, and
finalize on unwritten rows."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cache_schema import AgentCache, ArraySpec, PartialCacheError
from cache_schema.views import ViewSpec, apply_view, view_params
from distill.gates import GateSet, MLPGate
from distill.losses import LossWeights, distill_loss, lac_loss, vac_loss
from distill.trainer import RunConfig, learning_rate
from extract.families.vision import vit_token_grids


# ---- ViT hidden states -> token grids ---------------------------------------------------------------------------

def test_vit_token_grids_drops_cls_and_keeps_raster_order():
    batch, layers, grid, dim = 2, 3, 3, 4
    cls_marker = -1000.0
    hidden_states = []
    for layer in range(layers + 1):   # embeddings, then one entry per block
        states = torch.empty(batch, 1 + grid * grid, dim)
        states[:, 0] = cls_marker
        for patch in range(grid * grid):
            for b in range(batch):
                states[b, 1 + patch] = torch.tensor([b, layer, patch, 0.5])
        hidden_states.append(states)
    grids = vit_token_grids(tuple(hidden_states))
    assert grids.shape == (batch, layers, grid, grid, dim)
    assert (grids != cls_marker).all()
    for b in range(batch):
        for layer in range(layers):
            for row in range(grid):
                for col in range(grid):
                    expected = [b, layer + 1, row * grid + col, 0.5]   # block outputs only, raster order
                    assert grids[b, layer, row, col].tolist() == expected, (b, layer, row, col)


# ---- L_VAC against a hand computation ---------------------------------------------------------------------------

def fixed_gate(in_dim, weights):
    """A real MLPGate whose output weights are `weights` whatever its input (last layer zero, bias = log w)."""
    gate = MLPGate(in_dim, len(weights), hidden=4)
    with torch.no_grad():
        gate.net[-1].weight.zero_()
        gate.net[-1].bias.copy_(torch.tensor(weights).log())
    return gate


def test_vac_equals_the_sum_over_layers_of_l1_to_the_normalised_fused_target():
    g = torch.Generator().manual_seed(0)
    student_layers, agent_layers, batch, tokens, dim = 2, 4, 2, 5, 6
    student = F.normalize(torch.randn(student_layers, batch, tokens, dim, generator=g), dim=-1)
    agents = [F.normalize(torch.randn(batch, agent_layers, tokens, dim, generator=g), dim=-1) for _ in range(2)]
    layer_weights = [(0.7, 0.3), (0.2, 0.8)]
    gates = [fixed_gate(2 * dim, w) for w in layer_weights]
    loss, weights = vac_loss(student, agents, gates)

    expected = 0.0
    for layer, (w0, w1) in enumerate(layer_weights):
        agent_layer = 2 * layer + 1                       # 2 student layers over 4 agent layers: [1, 3]
        fused = w0 * agents[0][:, agent_layer] + w1 * agents[1][:, agent_layer]
        assert (fused.norm(dim=-1) < 0.99).all()          # the agents disagree: the fused norm is below 1
        target = fused / fused.norm(dim=-1, keepdim=True)
        expected += (student[layer] - target).abs().mean().item()
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    torch.testing.assert_close(weights, torch.tensor(layer_weights)[:, None].expand(2, batch, 2))


# ---- L_LAC: the pipeline re-normalises by default ---------------------------------------------------------------

def test_lac_renormalises_by_default_in_the_pipeline():
    assert LossWeights().renormalize_language is True
    config = RunConfig(dataset="synthetic", protocol="base2novel", shots=4, seed=1)
    assert config.loss.renormalize_language is True

    g = torch.Generator().manual_seed(3)
    classes, dim = 4, 8
    agents = {name: F.normalize(torch.randn(classes, dim, generator=g), dim=-1) for name in ("gpt3", "vicuna")}
    text = torch.randn(classes, dim, generator=g)
    gate = fixed_gate(2 * dim, (0.5, 0.5))
    fused = 0.5 * agents["gpt3"] + 0.5 * agents["vicuna"]
    student = F.normalize(text, dim=-1)
    renormalised = (student - F.normalize(fused, dim=-1)).abs().mean().item()
    official = (student - fused).abs().mean().item()
    assert abs(renormalised - official) > 1e-3

    gates = GateSet("mlp", [], gate, None, language_agents=["gpt3", "vicuna"])
    logits, labels = torch.zeros(2, classes), torch.tensor([0, 1])

    def lac(weights):
        return distill_loss(logits, labels, gates=gates, weights=weights, text_features=text,
                            language_features=agents)[1]["lac"]

    assert math.isclose(lac(LossWeights()), renormalised, rel_tol=1e-5)
    assert math.isclose(lac(config.loss), renormalised, rel_tol=1e-5)
    assert math.isclose(lac(LossWeights(renormalize_language=False)), official, rel_tol=1e-5)
    assert math.isclose(lac_loss(text, list(agents.values()), gate)[0].item(), renormalised, rel_tol=1e-5)


# ---- learning-rate schedule (reference §7: Dassl constant warm-up + CosineAnnealingLR) ---------------------------

def test_learning_rate_schedule_matches_the_reference_trace():
    optim = RunConfig(dataset="synthetic", protocol="base2novel", shots=16, seed=1).optim
    assert (optim.epochs, optim.lr, optim.warmup_epochs, optim.warmup_lr) == (20, 0.0025, 1, 1e-5)
    assert learning_rate(optim, 0) == 1e-5                                   # warm-up, not the base lr
    assert math.isclose(learning_rate(optim, 1), 0.0025, rel_tol=1e-12)      # cosine starts at the base lr
    assert math.isclose(learning_rate(optim, 2), 0.0024846104257439223, rel_tol=1e-9)
    assert math.isclose(learning_rate(optim, 19), 6.117935463105809e-05, rel_tol=1e-9)  # never reaches 0


# ---- view distribution --------------------------------------------------------------------------------------------

GOLDEN_VIEWS = [   # (key, view id, width, height) -> (x0, y0, width, height, flip) with ViewSpec()
    ("class_0/image_0.png", 1, 64, 64, [12, 5, 32, 42, 1]),
    ("class_0/image_0.png", 5, 64, 64, [6, 6, 57, 52, 0]),
    ("class_0/image_0.png", 7, 64, 64, [21, 14, 37, 48, 1]),
    ("class_2/c.png", 2, 50, 70, [10, 28, 20, 15, 1]),
    ("class_2/c.png", 3, 50, 70, [0, 27, 50, 41, 0]),
    ("class_2/c.png", 5, 640, 480, [129, 6, 467, 474, 1]),
    ("wide.png", 0, 40, 30, [5, 0, 30, 30, 0]),
    ("tall.png", 0, 30, 41, [0, 5, 30, 30, 0]),
]


@pytest.mark.parametrize("key, view_id, width, height, expected", GOLDEN_VIEWS)
def test_view_params_golden_values(key, view_id, width, height, expected):
    params = view_params(key, view_id, width, height)
    assert params.dtype == np.int32 and params.tolist() == expected


def test_view_distribution_flips_half_and_spans_the_crop_scale():
    width, height, draws = 1000, 800, 3000
    params = np.stack([view_params(f"class_{i % 7}/image_{i}.png", 1 + i % 3, width, height) for i in range(draws)])
    x0, y0, w, h, flip = params.T
    assert ((x0 >= 0) & (y0 >= 0) & (x0 + w <= width) & (y0 + h <= height)).all()
    assert abs(flip.mean() - 0.5) < 0.05                      # 5 sigma for 3000 fair coins is 0.046
    area = w * h / (width * height)
    assert area.min() >= 0.079 and area.max() <= 1.0          # scale (0.08, 1.0), up to rounding of w and h
    assert area.min() < 0.1 and area.max() > 0.95             # ... and both ends are reached
    aspect = w / h
    assert aspect.min() >= 0.745 and aspect.max() <= 1.34             # ratio (3/4, 4/3), up to rounding
    assert not view_params("a.png", 1, width, height, ViewSpec(flip=False))[4]


def test_apply_view_crops_the_box_on_a_square_image():
    """A swapped box (x <-> y) stays inside a square image: only the pixels tell. Red = 3x, green = 3y, and
    bicubic resampling keeps a linear ramp linear, so each output pixel's colour says where it came from."""
    side, size = 64, 16
    y, x = np.mgrid[0:side, 0:side]
    image = Image.fromarray(np.stack([3 * x, 3 * y, np.zeros_like(x)], axis=-1).astype(np.uint8))
    x0, y0, w, h = 8, 24, 16, 32                              # x0 != y0 and w != h
    rows, cols = np.mgrid[0:size, 0:size]
    red = 3 * (x0 + (cols + 0.5) * w / size - 0.5)            # output pixel centres mapped back into the box
    green = 3 * (y0 + (rows + 0.5) * h / size - 0.5)
    view = np.asarray(apply_view(image, [x0, y0, w, h, 0], size), dtype=np.float64)
    np.testing.assert_allclose(view[..., 0], red, atol=1.0)
    np.testing.assert_allclose(view[..., 1], green, atol=1.0)
    flipped = np.asarray(apply_view(image, [x0, y0, w, h, 1], size), dtype=np.float64)
    np.testing.assert_allclose(flipped[..., 0], red[:, ::-1], atol=1.0)
    np.testing.assert_allclose(flipped[..., 1], green, atol=1.0)


# ---- finalize refuses unwritten rows on every backend ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
@pytest.mark.parametrize("written", [0, 1])
def test_finalize_with_unwritten_rows_is_partial(tmp_path, backend, written):
    arrays = {"token_mean": ArraySpec((2, 4), "float32"), "views": ArraySpec((5,), "int32")}
    fields = {"agent": {"name": "toy"}, "dataset": {"name": "toyset", "split_hash": "abc"}}
    cache = AgentCache.open(tmp_path, "toyset", "toy", fields, arrays, backend=backend)
    plan = cache.plan([("a.png", 0), ("b.png", 0), ("c.png", 0)])
    cache.create_segments()
    [(name, local_rows)] = plan[0]
    with cache.segment_writer(name) as writer:
        for local in local_rows[:written]:
            writer.write([local], {"token_mean": np.ones((1, 2, 4), np.float32), "views": np.ones((1, 5), np.int32)})
    with pytest.raises(PartialCacheError, match="rows still missing"):
        cache.finalize()
    assert json.loads((cache.path / "manifest.json").read_text())["status"] == "partial"
    assert not (cache.path / "rows.json").exists()
