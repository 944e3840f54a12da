"""Vision agents (DINO, MAE, SAM, ViTDet): per (image, view), every block's patch tokens on the student's grid.

Stage 2 pulls the student's patch tokens towards these, so an agent must see exactly the student's pixels: a row is
(key, view id), its crop box and flip come from `cache_schema.views` and are stored with the row. Each agent gets
its own normalisation (the official code gave MAE/DINO/ViTDet mean = std = 0.5 outside ImageNet and fed SAM 0-255
statistics on a [0, 1] image; reference §10 rows 4-5).
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np

from cache_schema.arrays import ArraySpec
from cache_schema.quantize import quantize_int8
from cache_schema.views import IMAGE_DECODING_VERSION, apply_view, load_rgb, view_params
from extract.loading import torch_dtype

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOKEN_DTYPES = ("float16", "float32", "int8")
GRID_POLICY = "bilinear (antialiased) resample to the student grid if the agent grid differs"


class VisionRuntime:
    """A loaded vision agent. Subclasses implement `block_outputs`; the rest is shared.

    `mean`/`std` are in the units of `pixel_scale` (1 = a [0, 1] image, 255 = a 0-255 image)."""

    def __init__(self, model, student, *, mean, std, pixel_scale=1.0, device="cpu", dtype="float32", source=None):
        self.model = model.to(device=device, dtype=torch_dtype(dtype)).eval().requires_grad_(False)
        self.mean, self.std, self.pixel_scale = tuple(mean), tuple(std), float(pixel_scale)
        self.device, self.dtype = device, dtype
        self.image_size, self.grid = student.image_size, student.grid
        self.num_layers = model.config.num_hidden_layers
        self.dim = model.config.hidden_size
        patch = model.config.patch_size
        self.native_grid = student.image_size // (patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.source = source or {}

    def block_outputs(self, pixels):
        """Normalised pixels [B, 3, S, S] -> block outputs [B, L, g, g, D] on the agent's own grid g."""
        raise NotImplementedError

    def encode(self, pixels):
        """Normalised pixels -> every block's patch tokens [B, L, G*G, D] (float32, on the agent's device) on the
        student grid G.

        Tokens are the block outputs without final norm and without CLS, resampled bilinearly to G x G when the
        agent's grid differs (e.g. a patch-32 student)."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            grids = self.block_outputs(pixels.to(self.device, self.model.dtype)).float()
        batch, layers, g, _, dim = grids.shape
        if g != self.grid:
            flat = grids.reshape(batch * layers, g, g, dim).permute(0, 3, 1, 2)
            flat = F.interpolate(flat, size=(self.grid, self.grid), mode="bilinear", align_corners=False,
                                 antialias=True)
            grids = flat.permute(0, 2, 3, 1).reshape(batch, layers, self.grid, self.grid, dim)
        return grids.reshape(batch, layers, self.grid * self.grid, dim)


def vit_token_grids(hidden_states):
    """ViT `hidden_states` (embeddings, block 1, ..., block L; CLS first) -> [B, L, g, g, D] without CLS."""
    import torch

    blocks = torch.stack(hidden_states[1:], dim=1)[:, :, 1:]
    batch, layers, tokens, dim = blocks.shape
    g = int(round(tokens ** 0.5))
    if g * g != tokens:
        raise ValueError(f"expected a square token grid, got {tokens} patch tokens")
    return blocks.reshape(batch, layers, g, g, dim)


# ---- family protocol -------------------------------------------------------------------------------------------

def rows(ctx) -> list[tuple[str, int]]:
    if ctx.views < 1:
        raise ValueError(f"views must be >= 1, got {ctx.views}")
    return [(key, view_id) for key in ctx.keys for view_id in range(ctx.views)]


def arrays(runtime, ctx) -> dict[str, ArraySpec]:
    layers = selected_layers(runtime, ctx)
    tokens = pooled_grid(ctx) ** 2
    specs = {
        "tokens": ArraySpec((len(layers), tokens, runtime.dim), _token_dtype(ctx)),
        "token_mean": ArraySpec((len(layers), runtime.dim), "float32"),
        "views": ArraySpec((5,), "int32"),
    }
    if ctx.dtype == "int8":
        specs["tokens_scale"] = ArraySpec((len(layers), tokens), "float32")
    return specs


def prepare(runtime, rows, ctx):
    """One batch's model input, built on a loader worker while the model runs the batch before: each image decoded
    once, its views cut and resized (`cache_schema.views`), the agent's normalisation applied.
    -> (pixels [R, 3, S, S] float32, views [R, 5] int32)."""
    images, params, pixels = {}, [], []
    for key, view_id in rows:
        if key not in images:
            images[key] = _open_image(ctx, key)
        image = images[key]
        view = view_params(key, view_id, image.width, image.height, ctx.view_spec)
        params.append(view)
        pixels.append(np.asarray(apply_view(image, view, ctx.student.image_size), dtype=np.uint8))
    return normalise_bytes(np.stack(pixels), runtime), np.stack(params).astype(np.int32)


def compute(runtime, rows, ctx, prepared=None, stored: bool = True) -> dict[str, np.ndarray]:
    """One batch of (key, view id) rows -> tokens [R, L, T, D], token_mean [R, L, D], views [R, 5] (+ scales).

    `prepared` is `prepare`'s output for these rows (made here if None). stored=False leaves the tokens float32
    for `finish` to convert on the writer's thread, off the thread that runs the model."""
    import torch.nn.functional as F

    layers = selected_layers(runtime, ctx)
    pooled_grid(ctx)  # validate the context before any work
    _token_dtype(ctx)
    if runtime.grid != ctx.student.grid or runtime.image_size != ctx.student.image_size:
        raise ValueError(f"agent was loaded for a {runtime.image_size}px / {runtime.grid}x{runtime.grid} student, "
                         f"the context has {ctx.student.image_size}px / {ctx.student.grid}x{ctx.student.grid}")
    pixels, views = prepare(runtime, rows, ctx) if prepared is None else prepared
    tokens = runtime.encode(pixels)
    if layers != tuple(range(runtime.num_layers)):
        tokens = tokens[:, list(layers)]
    tokens = F.normalize(tokens, dim=-1)
    if ctx.token_pool > 1:
        tokens = pool_tokens(tokens, ctx.student.grid, ctx.token_pool)
    out = {"token_mean": tokens.mean(dim=2).cpu().numpy(), "views": views, "tokens": tokens.cpu().numpy()}
    return finish(out, ctx) if stored else out


def finish(arrays: dict[str, np.ndarray], ctx) -> dict[str, np.ndarray]:
    """`compute(..., stored=False)`'s float32 tokens -> the cache's dtype: float16, float32, or int8 with a
    per-token scale; bit for bit what numpy's `astype` and `quantize_int8` give."""
    import torch

    tokens, out = arrays["tokens"], dict(arrays)
    if ctx.dtype == "int8":
        out["tokens"], out["tokens_scale"] = quantize_int8(tokens)
    elif ctx.dtype == "float16" and not np.isnan(arrays["token_mean"]).any():
        # torch's cast runs ~10x faster than numpy's and rounds alike, but writes other NaN payloads: a NaN token
        # makes its token mean NaN, so the small token_mean array says when numpy must cast instead
        out["tokens"] = torch.from_numpy(np.ascontiguousarray(tokens, np.float32)).to(torch.float16).numpy()
    elif ctx.dtype == "float16":
        out["tokens"] = tokens.astype(np.float16)
    else:
        out["tokens"] = tokens.astype(np.float32, copy=False)
    return out


def fingerprint_fields(ctx) -> dict:
    return {
        "student_image_size": ctx.student.image_size,
        "student_grid": ctx.student.grid,
        "view_spec": ctx.view_spec.to_dict(),
        "image_decoding": IMAGE_DECODING_VERSION,
        "layers": None if ctx.layers is None else [int(layer) for layer in ctx.layers],
        "token_pool": ctx.token_pool,
        "dtype": ctx.dtype,
    }


def extra_files(runtime, ctx) -> dict[str, bytes]:
    return {}


def provenance(runtime, ctx) -> dict:
    """The loaded agent's block count and the layer numbers stored: stage 2 pairs each stored layer with the
    student block of the same relative depth, and `--layers` names the same layers in both stages."""
    return {"agent_layers": {"depth": int(runtime.num_layers),
                             "stored": [int(layer) for layer in selected_layers(runtime, ctx)]}}


# ---- pieces (public so tests and benchmarks can check them) ----------------------------------------------------

def normalise_pixels(pixels, runtime):
    """[B, 3, S, S] in [0, 1] -> the agent's input: scale to its value range, then its own mean/std."""
    import torch

    mean = torch.tensor(runtime.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(runtime.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels * runtime.pixel_scale - mean) / std


def normalise_bytes(pixels: np.ndarray, runtime):
    """8-bit views [R, S, S, 3] -> the agent's input [R, 3, S, S] float32: `normalise_pixels` of the views in
    [0, 1], looked up per byte (`pixel_table`)."""
    import torch

    index = pixels.astype(np.intp)   # -> (value, channel) in the table, in place: no temporaries to fault in
    index *= 3
    index += np.arange(3)
    normalised = np.take(pixel_table(runtime.mean, runtime.std, runtime.pixel_scale), index)
    return torch.from_numpy(normalised).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=None)
def pixel_table(mean: tuple, std: tuple, pixel_scale: float) -> np.ndarray:
    """`normalise_pixels` of every 8-bit value in each channel, [256 * 3] value-major: looking a batch's bytes up
    gives torch's element-wise numbers (it made them) in one single-threaded pass, so a loader worker does not
    contend for the model's thread pool."""
    import torch

    levels = (torch.arange(256, dtype=torch.uint8).float() / 255.0).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    agent = SimpleNamespace(mean=mean, std=std, pixel_scale=pixel_scale)
    return normalise_pixels(levels, agent)[0, :, 0, :].T.contiguous().numpy().reshape(-1)


def pool_tokens(tokens, grid: int, pool: int):
    """[B, L, G*G, D] unit tokens -> pool x pool average pooling on the grid, re-normalised: [B, L, (G/pool)^2, D]."""
    import torch.nn.functional as F

    batch, layers, _, dim = tokens.shape
    maps = tokens.reshape(batch * layers, grid, grid, dim).permute(0, 3, 1, 2)
    maps = F.avg_pool2d(maps, kernel_size=pool)
    pooled = maps.permute(0, 2, 3, 1).reshape(batch, layers, -1, dim)
    return F.normalize(pooled, dim=-1)


def selected_layers(runtime, ctx) -> tuple[int, ...]:
    if ctx.layers is None:
        return tuple(range(runtime.num_layers))
    layers = tuple(int(layer) for layer in ctx.layers)
    bad = [layer for layer in layers if not 0 <= layer < runtime.num_layers]
    if bad or not layers:
        raise ValueError(f"layers {list(layers)}: this agent has layers 0..{runtime.num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {list(layers)} repeat a layer")
    return layers


def pooled_grid(ctx) -> int:
    grid, pool = ctx.student.grid, ctx.token_pool
    if pool < 1 or grid % pool:
        raise ValueError(f"token_pool {pool} must be >= 1 and divide the student grid {grid}")
    return grid // pool


def _token_dtype(ctx) -> str:
    if ctx.dtype not in TOKEN_DTYPES:
        raise ValueError(f"vision dtype must be one of {TOKEN_DTYPES}, got {ctx.dtype!r}")
    return ctx.dtype


def _open_image(ctx, key: str):
    path = ctx.image_path(key)
    if not path.is_file():
        raise FileNotFoundError(f"image {key!r} not found at {path}")
    return load_rgb(path)
