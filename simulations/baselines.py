"""Centralised baselines: pooled training over all sites, and local-only training per site.

Both use the site's own training loop (``client.training.train.train_stage``) and evaluation, so a
federated run, a pooled run and a local run differ only in which data each model sees.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from client.data.cache import SiteCache
from client.data.dataset import SliceDataset, dataset_labels, hematoma_slices, pooled, split_slices
from client.data.expansion import ExpansionRule, format_disagreements, with_derived_expansion
from client.training.evaluate import evaluate
from client.training.gan_augment import GanAugment, NoGanData, augmented_training_set
from client.training.stage2_features import with_unet_vectors
from client.training.train import TrainConfig, output_columns, train_stage
from common.checkpoint import save_checkpoint
from common.config import PreprocessConfig
from common.losses import label_counts, pos_weight_from_counts
from common.model import JointModel, build_joint_model
from common.presets import ModelConfig
from common.runtime import resolve_device


@dataclass(frozen=True)
class FitConfig:
    """A two-stage training budget: epochs of each stage and the per-stage TrainConfig."""

    epochs_stage1: int = 4
    epochs_stage2: int = 4
    train: TrainConfig = TrainConfig()
    lr_stage2: float | None = None
    split_by: str = "patient"
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    eval_batch_size: int = 32
    #: Stage 2 adds SNGAN-generated slices (docs/gan.md): one GAN on the pooled training crops.
    gan: GanAugment | None = None


def site_splits(caches: dict[str, SiteCache], fit: FitConfig) -> dict[str, dict[str, SliceDataset]]:
    """Per site, the train/val/test datasets (patient-disjoint unless ``split_by='slice'``)."""
    out = {}
    for name, cache in caches.items():
        idx = split_slices(cache, fit.split_fractions, seed=fit.train.seed, by=fit.split_by)
        out[name] = {split: SliceDataset(cache, i) for split, i in idx.items()}
    return out


def stage_pos_weight(model: JointModel, ds: Dataset, max_weight: float | None = None) -> torch.Tensor:
    """The paper's weight neg/pos per output, from the labels of the slices stage 2 trains on
    (``hematoma_slices``), capped at ``max_weight``."""
    pos, neg = label_counts(dataset_labels(hematoma_slices(ds))[:, output_columns(model)])
    return pos_weight_from_counts(pos, neg, max_weight=max_weight)


def scalar_metrics(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "arrays"}


def fit_two_stages(
    model: JointModel,
    train_ds: Dataset,
    val_ds: Dataset | None,
    fit: FitConfig,
    device: torch.device | str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Stage 1 (U-Net) then stage 2 (classifier, U-Net frozen), one evaluation per epoch.

    Returns the history: one row per epoch with stage, train loss and validation metrics.
    ``device``: "auto" is the GPU when there is one (``common.runtime.resolve_device``).
    """
    device = resolve_device(str(device))
    history = []
    pos_weight = stage_pos_weight(model, train_ds)
    train_of = {1: train_ds, 2: hematoma_slices(train_ds)}
    for stage, epochs in ((1, fit.epochs_stage1), (2, fit.epochs_stage2)):
        if stage == 2 and fit.gan is not None and fit.gan.ratio > 0 and epochs:
            try:
                train_of[2], _, added = augmented_training_set(train_of[2], fit.gan, fit.train.seed, device)
            except NoGanData as exc:
                log(f"stage 2: no generated slices ({exc})")
            else:
                pos_weight = stage_pos_weight(model, train_of[2])  # the paper's weights over what stage 2 sees
                log(f"stage 2: {added} generated slices beside {len(train_ds)} real ones (in memory only)")
        if stage == 2 and epochs:
            train_of[2] = with_unet_vectors(model, train_of[2], device)  # the frozen U-Net, computed once
        lr = fit.lr_stage2 if stage == 2 and fit.lr_stage2 is not None else fit.train.lr
        cfg = replace(fit.train, epochs=1, schedule="constant")
        for epoch in range(epochs):
            # One cosine decay over the stage's epochs (each epoch is one train_stage call,
            # so that the model is evaluated between epochs).
            lr_e = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs)) if fit.train.schedule == "cosine" else lr
            cfg_e = replace(cfg, lr=lr_e, seed=fit.train.seed + 1000 * stage + epoch)
            loader = cfg_e.loader(train_of[stage], stage)
            result = train_stage(
                model, loader, stage, cfg_e, device, pos_weight if stage == 2 else None, progress=progress
            )
            row = {
                "stage": stage,
                "epoch": epoch + 1,
                "train_loss": result.loss,
                "images_per_second": result.images_per_second,
            }
            if val_ds is not None and len(val_ds):
                row.update(
                    {
                        f"val/{k}": v
                        for k, v in scalar_metrics(evaluate(model, val_ds, device, fit.eval_batch_size)).items()
                    }
                )
            history.append(row)
            log(
                f"stage {stage} epoch {epoch + 1}/{epochs}: loss {result.loss:.4f} "
                f"({result.images_per_second:.1f} img/s)"
                + (
                    f", val dice {row.get('val/dice', float('nan')):.3f}, "
                    f"val macro-AUC {row.get('val/macro_auc_study', float('nan')):.3f}"
                    if "val/dice" in row
                    else ""
                )
            )
    return history


def per_site_test_metrics(
    model: JointModel, splits: dict[str, dict[str, SliceDataset]], device, batch_size: int = 32
) -> dict[str, dict]:
    return {site: evaluate(model, s["test"], device, batch_size) for site, s in splits.items() if len(s["test"])}


def expansion_caches(
    caches: dict[str, SiteCache], rule: ExpansionRule, log: Callable[[str], None] = print
) -> dict[str, SiteCache]:
    """Every site's cache with its empty expansion labels derived from the follow-ups (docs/gan.md);
    each site's disagreements with labels.csv are logged by study pseudonym."""
    out = {}
    for name, cache in caches.items():
        out[name], rows = with_derived_expansion(cache, rule)
        log(f"{name}: {format_disagreements(rows)}")
    return out


def run_pooled(
    caches: dict[str, SiteCache],
    model_cfg: ModelConfig,
    preprocess: PreprocessConfig,
    fit: FitConfig,
    out_dir: Path | str,
    device: torch.device | str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
    expansion_rule: ExpansionRule | None = None,
) -> dict:
    """Pooled (centralised) baseline: one model on every site's training patients.

    Writes ``checkpoint.pt``, ``metrics.json`` (history, per-site and pooled test metrics) and
    ``curves.png`` into ``out_dir``; returns the metrics dict. With ``model_cfg.predict_expansion``
    the expansion labels are derived by ``expansion_rule`` where labels.csv leaves them empty, and
    ``metrics["expansion"]`` puts the head's study AUROC beside volume alone and the marker-count score.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(str(device))
    if model_cfg.predict_expansion:
        caches = expansion_caches(caches, expansion_rule or ExpansionRule(), log)
    splits = site_splits(caches, fit)
    train_ds = pooled([s["train"] for s in splits.values()])
    val_ds = pooled([s["val"] for s in splits.values()])
    test_ds = pooled([s["test"] for s in splits.values()])
    log(
        f"pooled training on {len(caches)} sites: {len(train_ds)} train / {len(val_ds)} val / {len(test_ds)} test slices"
    )
    model = build_joint_model(model_cfg, seed=fit.train.seed)
    t0 = time.perf_counter()
    history = fit_two_stages(model, train_ds, val_ds, fit, device, progress, log)
    seconds = time.perf_counter() - t0
    test = evaluate(model, test_ds, device, fit.eval_batch_size)
    per_site = per_site_test_metrics(model, splits, device, fit.eval_batch_size)
    save_checkpoint(
        out_dir / "checkpoint.pt",
        model,
        model_cfg,
        preprocess,
        {"method": "pooled", "stage": 2, "seed": fit.train.seed, "train_seconds": seconds},
    )
    metrics = {
        "method": "pooled",
        "model": model_cfg.to_dict(),
        "preprocess": preprocess.to_dict(),
        "fit": {
            "epochs_stage1": fit.epochs_stage1,
            "epochs_stage2": fit.epochs_stage2,
            "split_by": fit.split_by,
            "train": fit.train.to_dict(),
        },
        "train_seconds": seconds,
        "history": history,
        "test": scalar_metrics(test),
        "per_site": {k: scalar_metrics(v) for k, v in per_site.items()},
    }
    if model_cfg.predict_expansion:
        from simulations.expansion_baselines import compare_expansion, study_table

        metrics["expansion"] = compare_expansion(
            study_table(train_ds), study_table(test_ds), test.get("auc_study/expansion", float("nan"))
        )
        log("expansion study AUROC: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["expansion"].items()))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    from simulations.report.figures import plot_curves

    plot_curves(history, out_dir / "curves.png")
    return metrics


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
