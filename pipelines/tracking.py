"""Experiment trackers for stage 2 (`--report-to tensorboard[,wandb]`): the records of metrics.jsonl, the final
accuracies and the resolved configuration, sent as they are written.

metrics.jsonl stays the record the project reads (`transagent report`); a tracker is a view of it. TensorBoard
events go to `<run dir>/tensorboard/` (so `tensorboard --logdir runs/` shows every run under its path); W&B is an
extra (`pip install 'transagent-cache[tracking]'`) and follows WANDB_MODE (offline works without an account) and
WANDB_PROJECT (default "transagent").

Tags: `loss/<term>` (every term of the record, unweighted, and `loss/total`), `train/lr`, `gate/<modality>/<agent>`
(the mean gate weight), `accuracy/<split>`; the step is the optimiser step counted over the whole run.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

TRACKERS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
NOT_SCALARS = ("epoch", "step")


class TrackingError(ValueError):
    """An unknown tracker, or one that is not installed."""


def parse_report_to(value) -> tuple[str, ...]:
    """'tensorboard,wandb' -> ('tensorboard', 'wandb'); '', 'none' -> ()."""
    names = [name.strip().lower() for name in str(value or "").split(",") if name.strip()]
    if names in (["none"], []):
        return ()
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise TrackingError(f"--report-to {value}: unknown tracker(s) {', '.join(unknown)}; known: "
                            f"{', '.join(TRACKERS)} (comma-separated) or none")
    return tuple(dict.fromkeys(names))


def scalars(record: dict) -> dict[str, float]:
    """One metrics.jsonl record as tracker tags."""
    tags = {}
    for key, value in record.items():
        if key in NOT_SCALARS or not isinstance(value, (int, float)):
            continue
        tags[key if key.startswith("gate/") else ("train/lr" if key == "lr" else f"loss/{key}")] = float(value)
    return tags


class Trackers:
    """The trackers of one run, opened by `config` (a run that only reads back its final.json opens none);
    `epoch(records)` takes one epoch's metrics.jsonl records."""

    def __init__(self, names: tuple[str, ...], run_dir, run_name: str):
        self.names, self.run_dir, self.run_name = names, Path(run_dir), run_name
        self.writers: list = []
        self.last_step = 0

    def config(self, resolved: dict) -> None:
        if self.names and not self.writers:
            self.writers = [TensorBoardWriter(self.run_dir / TENSORBOARD_DIR) if name == "tensorboard"
                            else WandbWriter(self.run_dir, self.run_name) for name in self.names]
        for writer in self.writers:
            writer.config(resolved)

    def epoch(self, records: list[dict]) -> None:
        """Steps are numbered epoch by epoch (every epoch has the same number of steps), so a resumed run
        continues the same axis."""
        for record in records:
            step = (int(record["epoch"]) - 1) * len(records) + int(record["step"])
            tags = scalars(record)
            for writer in self.writers:
                writer.scalars(tags, step)
            self.last_step = max(self.last_step, step)
        for writer in self.writers:   # a run killed later keeps what it trained
            writer.flush()

    def accuracy(self, accuracy: dict) -> None:
        """At the last step trained (a run of zero epochs: step 0)."""
        tags = {f"accuracy/{name}": float(value) for name, value in accuracy.items()
                if isinstance(value, (int, float))}
        for writer in self.writers:
            writer.scalars(tags, self.last_step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


def open_trackers(report_to, run_dir, run_name: str) -> Trackers:
    return Trackers(parse_report_to(report_to), run_dir, run_name)


class TensorBoardWriter:
    def __init__(self, directory: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise TrackingError(f"--report-to tensorboard needs the tensorboard package ({error}); "
                                "pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(directory))

    def config(self, resolved: dict) -> None:
        self.writer.add_text("config", "```json\n" + json.dumps(resolved, indent=1, sort_keys=True) + "\n```")

    def scalars(self, tags: dict[str, float], step: int) -> None:
        for tag, value in tags.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """One W&B run per run directory; its id comes from the directory, so a resumed run continues it."""

    def __init__(self, run_dir: Path, run_name: str):
        try:
            import wandb
        except ImportError:
            raise TrackingError("--report-to wandb needs the wandb package: pip install 'transagent-cache[tracking]' "
                                "(WANDB_MODE=offline works without an account)") from None
        self.wandb = wandb
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "transagent"), name=run_name, id=run_id,
                              resume="allow", dir=str(run_dir))

    def config(self, resolved: dict) -> None:
        self.run.config.update(resolved, allow_val_change=True)

    def scalars(self, tags: dict[str, float], step: int) -> None:
        self.run.log(tags, step=step)

    def flush(self) -> None:
        pass   # wandb syncs on its own

    def close(self) -> None:
        self.run.finish()
