"""Stage 2: train prompts + gates against the caches, evaluate the prompted student (agents and gates gone).

Determinism is by construction: the epoch's order and the view drawn for each image come from
numpy's default_rng([seed, epoch]); prompt and gate init from torch.manual_seed(seed). A checkpoint after every
epoch holds prompts, gates, optimiser, schedule position and RNG states, so a resumed run equals an
uninterrupted one bit for bit (on the same device). Checkpoints are safetensors, never pickles (`distill.checkpoints`).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill import checkpoints
from distill.batches import EpochOrder, StudentBatches, batch_loader, teacher_rows, to_device
from distill.config import DistillConfig, OptimConfig
from distill.data import CLIP_MEAN, CLIP_STD, TeacherBank, load_image, student_pixels
from distill.gates import build_gates
from distill.losses import distill_loss
from distill.student import build_student
from cache_schema import ViewSpec, view_params


@dataclass(frozen=True, kw_only=True)
class RunConfig(DistillConfig):
    """One stage-2 run as the trainer sees it: the method's settings and the data they train on."""

    dataset: str
    protocol: str
    shots: int
    seed: int
    agents: tuple[str, ...] = ()
    views: int | None = None                 # cached views to draw from (None = all cached; 1 = view 0 only)
    layers: tuple[int, ...] | None = None    # agent layers distilled by L_VAC, as extract numbers them (None = all)
    device: str = "cpu"
    workers: int = 0


class NonFiniteLoss(RuntimeError):
    pass


def learning_rate(optim: OptimConfig, epoch: int) -> float:
    """Constant warm-up, then cosine over `epochs` (Dassl's schedule: it never quite reaches zero)."""
    if epoch < optim.warmup_epochs:
        return optim.warmup_lr
    return optim.lr * (1 + math.cos(math.pi * (epoch - optim.warmup_epochs) / optim.epochs)) / 2


def epoch_items(keys, labels, views: int, seed: int, epoch: int) -> list[tuple[str, int, int]]:
    """This epoch's (key, view id, label) order: a permutation and one view per image, from (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(keys))
    drawn = rng.integers(0, views, size=len(keys))
    return [(keys[i], int(drawn[i]), int(labels[i])) for i in order]


class Trainer:
    def __init__(self, config: RunConfig, keys: list[str], labels: list[int], classnames: list[str], image_root,
                 bank: TeacherBank, run_dir, progress: bool = True):
        self.config, self.keys, self.labels, self.classnames = config, list(keys), list(labels), list(classnames)
        self.image_root, self.bank, self.run_dir, self.progress = Path(image_root), bank, Path(run_dir), progress
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.student = build_student(config.student.model, config.student.pretrained, config.prompts, classnames,
                                     self.device)
        geometry = self.student.geometry
        self.gates = build_gates(
            config.gates.router, vision_agents=list(bank.vision), vision_dim=geometry.width,
            student_layers=geometry.layers, language_agents=list(bank.language),
            language_dim=geometry.embed_dim, multimodal_agents=list(bank.multimodal),
            num_classes=len(classnames), hidden=config.gates.hidden).to(self.device)
        self.layer_pairs = bank.layer_pairs(geometry.layers, config.layers)
        self.parameters = [*self.student.trainable_parameters(), *self.gates.parameters()]
        if not self.parameters and config.optim.epochs > 0:
            raise ValueError("nothing to train: prompt depth 0 and no agents; zero-shot CLIP is --prompt-depth 0 "
                             "--epochs 0")
        self.optimizer = torch.optim.SGD(self.parameters or [torch.zeros(1, requires_grad=True)],
                                         lr=learning_rate(config.optim, 0), momentum=config.optim.momentum,
                                         weight_decay=config.optim.weight_decay)
        # Views drawn per image: as asked, else all that are cached, else the extract default (4) - view
        # parameters need no cache, so a run without vision agents sees the same augmentation distribution.
        self.views = config.views or bank.available_views() or 4
        self.view_spec = bank.view_spec or ViewSpec()
        self.epoch = 0
        self.mean = getattr(self.student.clip.visual, "image_mean", None) or CLIP_MEAN
        self.std = getattr(self.student.clip.visual, "image_std", None) or CLIP_STD
        self.autocast = _autocast(config.precision, self.device)
        self._check_views()

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"epoch": self.epoch, "prompts": self.student.prompt_state_dict(), "gates": self.gates.state_dict(),
                "gates_built_for": self.gates.describe(), "optimizer": self.optimizer.state_dict(),
                "schedule": {"epoch": self.epoch, "lr": learning_rate(self.config.optim, self.epoch)},
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                "config": asdict(self.config)}

    def save_checkpoint(self) -> Path:
        path = self.run_dir / checkpoints.FILE
        checkpoints.save(path, self.state())
        return path

    def load_checkpoint(self, path) -> None:
        state = checkpoints.load(path)
        if state["gates_built_for"] != self.gates.describe():
            raise ValueError(f"{path}: gates were built for {state['gates_built_for']}, this run has "
                             f"{self.gates.describe()}")
        self.student.load_prompt_state_dict(state["prompts"])
        self.gates.load_state_dict(state["gates"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.epoch = state["epoch"]

    # ------------------------------------------------------------------ training
    def _check_views(self) -> None:
        """The student must see the pixels the agents saw: compare rebuilt view parameters with the cache."""
        if not self.bank.vision or not self.keys:
            return
        for key in self.keys[:4]:
            image = load_image(self.image_root, key)
            for view in range(self.views):
                ours = view_params(key, view, image.width, image.height, self.view_spec)
                cached = self.bank.cached_view(key, view)
                if not np.array_equal(ours, cached):
                    raise ValueError(f"view {view} of {key}: cached crop {cached.tolist()} != recomputed "
                                     f"{ours.tolist()}; the cache was made from other images or view code")

    def fit(self, stop_after_epoch: int | None = None, metrics_path: Path | None = None, on_epoch=None) -> None:
        """Train to the last epoch; `on_epoch(records)` gets each finished epoch's metrics.jsonl records."""
        from tqdm import tqdm

        metrics_path = metrics_path or self.run_dir / "metrics.jsonl"
        order = EpochOrder(self.config.optim.batch_size)
        loader = self.batch_loader(order)
        while self.epoch < self.config.optim.epochs:
            if stop_after_epoch is not None and self.epoch >= stop_after_epoch:
                return
            lr = learning_rate(self.config.optim, self.epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            order.items = self.epoch_order()
            self.student.train()
            self.gates.train()
            bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{self.config.optim.epochs}", disable=not self.progress,
                       leave=False)
            records = []
            for step, batch in enumerate(bar):
                logged = self.step(batch.pixels, batch.labels, batch.items, batch.rows)
                records.append({"epoch": self.epoch + 1, "step": step, "lr": lr, **logged})
                bar.set_postfix(loss=f"{logged['total']:.3f}")
            self.epoch += 1
            with open(metrics_path, "a") as handle:
                for record in records:
                    handle.write(json.dumps(record) + "\n")
            self.save_checkpoint()
            if on_epoch is not None:
                on_epoch(records)

    def batch_loader(self, order: EpochOrder) -> torch.utils.data.DataLoader:
        """The loader of whole batches in `order` (`distill.batches`), built once per `fit`."""
        dataset = StudentBatches(self.image_root, self.student.geometry.image_size, self.view_spec, self.bank,
                                 self.mean, self.std)
        return batch_loader(dataset, order, self.config.workers, self.device)

    def epoch_order(self) -> list[tuple[str, int, int]]:
        """This epoch's items. One draw of the global torch RNG per epoch, as a DataLoader built for each epoch made
        it: the gates' noise comes from that RNG, so the draw keeps every result (the loader has its own generator)."""
        torch.empty((), dtype=torch.int64).random_()
        return epoch_items(self.keys, self.labels, self.views, self.config.seed, self.epoch)

    def step(self, pixels, labels, batch, rows: dict | None = None) -> dict:
        """One optimisation step on `batch`'s (key, view id, label) items; `rows` are its teacher rows when the
        loader read them (`distill.batches.teacher_rows`), else the step reads them."""
        keys = [key for key, _, _ in batch]
        views = [view for _, view, _ in batch]
        pixels, labels = pixels.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        inputs = self.teacher_inputs(keys, views) if rows is None else self.device_inputs(rows)
        with self.autocast:
            text_features = self.student.encode_text(self.classnames)
            image_features, tokens = self.student.encode_image(pixels, return_tokens=bool(self.bank.vision))
            logits = self.student.logits(image_features, text_features)
            if tokens is not None:
                tokens = match_grid(tokens, next(iter(inputs["vision_tokens"].values())).shape[2])
            total, logged = distill_loss(logits, labels, gates=self.gates, weights=self.config.loss,
                                         student_tokens=tokens, text_features=text_features,
                                         vision_pairs=[(p.student, p.stored) for p in self.layer_pairs], **inputs)
        bad = [name for name, value in logged.items() if not math.isfinite(value)]
        if bad:
            checkpoint = checkpoints.find(self.run_dir)
            kept = (f"the last good checkpoint ({checkpoint}, after epoch {self.epoch}) is kept"
                    if self.epoch > 0 and checkpoint is not None else
                    "no checkpoint was written (nothing was learned yet); check the caches with `transagent cache "
                    "verify` and the --lambda-* weights")
            raise NonFiniteLoss(f"loss term(s) {', '.join(bad)} became non-finite at epoch {self.epoch + 1}; {kept}")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return logged

    def teacher_inputs(self, keys, views) -> dict:
        """Every teacher input of the batch, on the device, read now."""
        return self.device_inputs(teacher_rows(self.bank, keys, views))

    def device_inputs(self, rows: dict) -> dict:
        """The batch's teacher rows on the device, with the class features every batch shares."""
        def tensor(array):
            return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

        inputs = to_device(rows, self.device)
        if self.bank.language:
            inputs["language_features"] = {name: tensor(value) for name, value in self.bank.language.items()}
        if self.bank.relational:
            inputs["bert_features"] = tensor(next(iter(self.bank.relational.values())))
        return inputs


def match_grid(tokens: torch.Tensor, agent_tokens: int) -> torch.Tensor:
    """Average-pool the student's [L, B, T, D] tokens onto a coarser agent grid (caches made with --token-pool)."""
    layers, batch, count, width = tokens.shape
    if count == agent_tokens:
        return tokens
    side, agent_side = math.isqrt(count), math.isqrt(agent_tokens)
    if side * side != count or agent_side * agent_side != agent_tokens or side % agent_side:
        raise ValueError(f"student grid of {count} tokens cannot be pooled onto the cached {agent_tokens} tokens")
    grid = tokens.reshape(layers * batch, side, side, width).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, side // agent_side).permute(0, 2, 3, 1).reshape(layers, batch, agent_tokens, width)
    return F.normalize(pooled, dim=-1)


def _autocast(precision: str, device: torch.device):
    import contextlib

    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(student, samples, classnames, image_root, batch_size: int = 100, device="cpu", progress=False) -> float:
    """Top-1 accuracy (%) on the un-augmented view (resize shortest side + centre crop)."""
    from tqdm import tqdm

    if not samples:
        return float("nan")
    student.eval()
    device = torch.device(device)
    size = student.geometry.image_size
    mean = getattr(student.clip.visual, "image_mean", None) or CLIP_MEAN
    std = getattr(student.clip.visual, "image_std", None) or CLIP_STD
    text = F.normalize(student.encode_text(list(classnames)).float(), dim=-1)
    correct = 0
    for start in tqdm(range(0, len(samples), batch_size), desc="evaluate", disable=not progress, leave=False):
        chunk = samples[start:start + batch_size]
        pixels = []
        for sample in chunk:
            image = load_image(image_root, sample.key)
            pixels.append(student_pixels(image, view_params(sample.key, 0, image.width, image.height), size,
                                         mean, std))
        features, _ = student.encode_image(torch.from_numpy(np.stack(pixels)).to(device), return_tokens=False)
        predictions = (F.normalize(features.float(), dim=-1) @ text.T).argmax(dim=-1).cpu()
        correct += int((predictions == torch.tensor([s.label for s in chunk])).sum())
    return 100.0 * correct / len(samples)
