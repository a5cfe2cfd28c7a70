"""One checkpoint per round, in the format ``hemexp predict`` loads (``common.checkpoint``).

Layout of the run's output folder: ``checkpoints/round-NNN.pt`` for every completed round, and
``global.pt``, the final model, written when the run ends; ``best.pt``, the round chosen on the
sites' validation patients (``server.federation``), rewritten whenever a round beats it. The round and stage a checkpoint was
written after are in its ``meta``; ``latest_checkpoint`` finds the one a run resumes from.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from common.config import PreprocessConfig
from common.presets import ModelConfig

_ROUND_FILE = re.compile(r"round-(\d+)\.pt$")


def round_checkpoint_path(out_dir: Path, server_round: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"round-{server_round:03d}.pt"


def save_round_checkpoint(
    out_dir: Path,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    preprocess: PreprocessConfig,
    meta: dict,
    keep: int = 0,
    gan: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the global model after round ``meta['round']``; keep the last ``keep`` (0: all).
    ``gan``: after a GAN round, the global G and D (``common.checkpoint``)."""
    path = save_checkpoint(
        round_checkpoint_path(out_dir, int(meta["round"])), model, model_cfg, preprocess, meta, gan=gan
    )
    if keep > 0:
        for old in round_checkpoints(out_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def round_checkpoints(out_dir: Path) -> list[Path]:
    """Round checkpoints of a run, oldest first."""
    folder = Path(out_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("round-*.pt") if (m := _ROUND_FILE.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The last round's checkpoint of a run, or None when it has none."""
    rounds = round_checkpoints(out_dir)
    return load_checkpoint(rounds[-1]) if rounds else None


def publish_final(out_dir: Path, round_path: Path, name: str = "global.pt") -> Path:
    """Copy the last round's checkpoint to ``global.pt`` (what a user passes to ``hemexp predict``)."""
    target = Path(out_dir) / name
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(round_path, tmp)
    tmp.replace(target)
    return target


def publish_best(out_dir: Path, round_path: Path) -> Path:
    """Copy the round chosen on validation to ``best.pt`` (it survives ``output.keep-checkpoints``)."""
    return publish_final(out_dir, round_path, "best.pt")
