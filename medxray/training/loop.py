"""The fine-tuning run: ``finetune(config) -> FinetuneResult`` and the epoch loop behind it.

Defaults follow CheXNet (Rajpurkar et al. 2017): DenseNet-121 from ImageNet with a new
14-way head, 224 px, batch 16, Adam(0.9, 0.999) at 1e-3 divided by 10 when the validation loss
plateaus, best checkpoint by validation mean AUROC. The loss is BCE-with-logits over the known
labels only (the dataset's mask), optionally with per-class positive weights.

A run never gets lost: every epoch writes ``last.pt`` (model + optimizer + scheduler + scaler +
RNG states + history) atomically, improvements write ``best.pt`` (model + metadata for
inference), and ``--resume RUN_DIR`` continues after the last completed epoch. Each epoch's
data order and augmentation are derived from ``(seed, epoch)`` alone, so an interrupted and
resumed run ends with the same weights as an uninterrupted one.

The same code runs under ``torchrun`` (DDP; gloo on CPU, NCCL on CUDA): rank 0 writes files,
and validation is sharded by index and gathered so each image is scored exactly once.

Configuration lives in :mod:`medxray.training.config`, resume/RNG/metadata state and the
best-epoch / early-stopping rule (:class:`~medxray.training.state.BestTracking`) in
:mod:`medxray.training.state`, the run's data in :mod:`medxray.training.data`, the loss, step,
optimiser and validation pass in :mod:`medxray.training.steps`, DDP helpers in
:mod:`medxray.training.distributed`. This module must not import evaluation beyond
:mod:`medxray.evaluation.metrics`, nor the CLI.
"""

from __future__ import annotations

import csv
import datetime
import functools
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from medxray.checkpoint import save_checkpoint
from medxray.data.loading import make_loader
from medxray.errors import ConfigError, MedxrayError
from medxray.evaluation.metrics import auroc_per_class
from medxray.fileio import atomic_output, atomic_write_text, json_line, to_jsonable
from medxray.hardware import default_num_workers, resolve_device, resolve_precision
from medxray.ood import stats_for_run
from medxray.training import distributed as mdist
from medxray.training.config import TrainConfig, absolute_paths, make_config, save_config, validate_config
from medxray.training.data import build_run_splits, check_run_data, epoch_dataset, positive_weights
from medxray.training.init_from import bn_eval, check_site_lock, freeze, init_config, load_init_weights
from medxray.training.state import (
    RUN_FILES,
    BestTracking,
    checkpoint_metadata,
    deterministic_algorithms,
    git_commit,
    prepare_resume,
    rng_states,
    save_training_checkpoint,
    scoped_rng,
    set_rng_states,
    versions,
)
from medxray.training.steps import make_optimizer, make_scheduler, predict_dataset, train_step

log = logging.getLogger(__name__)


class TrainingDivergedError(MedxrayError):
    """The loss became NaN/inf: the run stops, and the last good checkpoint is kept."""


@dataclass
class FinetuneResult:
    """What a run produced; ``best_checkpoint`` is the file inference and evaluation use."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_val_auroc: float
    epochs_completed: int
    stopped_reason: str
    history: list[dict[str, Any]]
    label_names: list[str]
    data_summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidationResult:
    """One validation pass over the whole validation set (every image scored once, all ranks).

    ``aurocs`` holds the per-class AUROC in label order (NaN where a class lacks positives or
    negatives among its known labels); ``mean_auroc`` is their mean over the finite ones (NaN when
    none is). ``loss`` is the masked mean BCE. ``predictions`` is
    :func:`medxray.training.steps.predict_dataset`'s result (``index``, ``names``, ``probs``,
    ``labels``, ``masks`` of shape (N, C), ``loss``).
    """

    loss: float
    aurocs: tuple[float, ...]
    mean_auroc: float
    predictions: Mapping[str, Any]

    @property
    def selected_by(self) -> str:
        """What selects the best epoch: ``val_mean_auroc``, or ``val_loss`` when no AUROC is finite."""
        return "val_mean_auroc" if any(math.isfinite(a) for a in self.aurocs) else "val_loss"

    @property
    def score(self) -> float:
        """The monitored score, higher is better: the mean AUROC, else the negated loss."""
        return self.mean_auroc if self.selected_by == "val_mean_auroc" else -self.loss


def finetune(config: TrainConfig | Mapping[str, Any], *, splits: Any = None) -> FinetuneResult:
    """Fine-tune a DenseNet on a chest X-ray dataset and return where the checkpoints are.

    ``splits`` lets programmatic callers pass an object shaped like
    :func:`medxray.data.build_datasets`' result instead of building one from the config.
    """
    cfg = config if isinstance(config, TrainConfig) else make_config(**dict(config))
    validate_config(cfg)
    cfg = absolute_paths(cfg)
    if cfg.init_from and not cfg.resume:
        cfg = init_config(cfg)
    check_before_data(cfg)
    resume_state: dict[str, Any] | None = None
    if cfg.resume:
        cfg, resume_state = prepare_resume(cfg)
    info = mdist.env_dist_info()
    device = resolve_device(cfg.device, info.local_rank)
    precision = resolve_precision(cfg.precision, device)
    info = mdist.init_distributed(device.type)
    try:
        with scoped_rng(cfg.seed, device), deterministic_algorithms(cfg.deterministic):
            run = _Run(cfg, device, precision, info, splits, resume_state)
            return run.fit()
    finally:
        mdist.shutdown(info)


def check_before_data(cfg: TrainConfig) -> None:
    """Refuse a bad model name or a missing weights file before any data is read or folder made.

    Raises :class:`ConfigError` (unknown ``model``) or :class:`medxray.errors.WeightsError` (a
    ``pretrained`` path that is not a file).
    """
    from medxray.errors import WeightsError
    from medxray.models import wants_pretrained
    from medxray.models.variants import get_variant

    get_variant(cfg.model)
    p = str(cfg.pretrained)
    if not cfg.resume and wants_pretrained(p) and p.lower() != "imagenet" and not Path(p).expanduser().is_file():
        raise WeightsError(f"--pretrained {p}: no such file; pass a torchvision-format state dict, imagenet or none")


class _Run:
    """State of one fine-tuning run (model, optimiser, data, bookkeeping)."""

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        precision: str,
        info: mdist.DistInfo,
        splits: Any,
        resume_state: dict[str, Any] | None,
    ) -> None:
        self.cfg, self.device, self.precision, self.info = cfg, device, precision, info
        self.resume_state = resume_state
        self.run_dir = self._run_dir()
        self.splits = splits if splits is not None else build_run_splits(cfg, info)
        self.label_names = list(self.splits.label_names)
        self.manifest_hash = str(getattr(self.splits, "manifest_hash", "") or "")
        check_run_data(
            cfg,
            self.splits,
            info,
            label_names=self.label_names,
            manifest_hash=self.manifest_hash,
            resume_state=resume_state,
        )
        check_site_lock(cfg, self.splits)
        self.num_workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(device)
        self._build_model()
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.best = BestTracking.start(cfg.early_stopping_patience)
        self.stopped: str | None = None
        self.last_is_good = True  # the last.pt on disk may become last.prev.pt at the next save
        if resume_state is not None:
            self._restore(resume_state)
        self.tb = self._tensorboard()

    # ---- setup ----------------------------------------------------------------------------

    def _run_dir(self) -> Path:
        cfg = self.cfg
        if cfg.out:
            path = str(Path(cfg.out).expanduser())
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            path = str(Path("runs") / f"{cfg.dataset}-{cfg.model}-{stamp}")
        path = mdist.all_gather_objects(path, self.info)[0]  # rank 0's choice
        run_dir = Path(path)
        # Checked on every rank (same answer on a shared file system), so none waits for a
        # rank that has already given up.
        if self.resume_state is None and any((run_dir / RUN_FILES[k]).exists() for k in ("last", "last_prev")):
            raise ConfigError(
                f"{run_dir} already holds a run (last.pt); continue it with --resume {run_dir} or choose another --out"
            )
        return run_dir  # made in __init__ once data and model are ready: a failed start leaves no folder

    def _build_model(self) -> None:
        from medxray.models import create_model, wants_pretrained

        cfg = self.cfg
        pretrained = None if (self.resume_state is not None or not wants_pretrained(cfg.pretrained)) else cfg.pretrained
        self.model = create_model(
            cfg.model,
            num_classes=len(self.label_names),
            pretrained=pretrained,
            memory_efficient=cfg.memory_efficient,
            drop_rate=cfg.drop_rate,
        )
        if cfg.init_from and self.resume_state is None:
            load_init_weights(self.model, cfg.init_from, self.label_names)
        if cfg.freeze_blocks or cfg.freeze_bn:
            log.info(
                "frozen: %d parameters (stem + %d dense block(s)%s)",
                freeze(self.model, cfg.freeze_blocks, cfg.freeze_bn),
                cfg.freeze_blocks,
                ", BatchNorm" if cfg.freeze_bn else "",
            )
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        net: torch.nn.Module = self.model
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            net = torch.compile(net)  # type: ignore[assignment]
        self.net = net
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scheduler: Any = make_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.pos_weight = self._pos_weight()

    def _pos_weight(self) -> torch.Tensor | None:
        if self.cfg.pos_weight == "none":
            return None
        w = positive_weights(self.splits.train)
        log.info("positive weights: %s", ", ".join(f"{n}={v:.1f}" for n, v in zip(self.label_names, w)))
        return torch.tensor(w, dtype=torch.float32, device=self.device)

    def _restore(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model_state"])
        self.optimizer.load_state_dict(st["optimizer"])
        if self.scheduler is not None and st.get("scheduler") is not None:
            self.scheduler.load_state_dict(st["scheduler"])
        if st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        set_rng_states(st["rng"], self.device)
        self.start_epoch = int(st["epoch"])
        self.history = list(st.get("history", []))
        self.best = BestTracking.from_state(st, self.cfg.early_stopping_patience)
        self.stopped = st.get("stopped")
        # resumed from last.prev.pt because last.pt is bad: the next save replaces last.pt, keeps last.prev.pt
        self.last_is_good = st.get("resumed_from", RUN_FILES["last"]) == RUN_FILES["last"]
        if self.info.is_main:
            # metrics.jsonl may hold a line for an epoch whose last.pt never landed: rewrite it from
            # the history that the checkpoint vouches for.
            atomic_write_text(self.run_dir / RUN_FILES["metrics"], "".join(json_line(r) + "\n" for r in self.history))
        log.info("resuming %s after epoch %d", self.run_dir, self.start_epoch)

    def _tensorboard(self) -> Any:
        if not (self.cfg.tensorboard and self.info.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("TensorBoard is not installed (pip install tensorboard); continuing without it")
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    # ---- bookkeeping --------------------------------------------------------------------

    def metadata(self, epoch: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return checkpoint_metadata(
            self.cfg,
            label_names=self.label_names,
            manifest_hash=self.manifest_hash,
            run_name=self.run_dir.name,
            epoch=epoch,
            metrics=metrics,
            data_summary=getattr(self.splits, "summary", None),
        )

    def _write_run_info(self) -> None:
        if not self.info.is_main:
            return
        save_config(self.cfg, self.run_dir / RUN_FILES["config"])
        summary = getattr(self.splits, "summary", {}) or {}
        info = {
            "versions": versions(),
            "git_commit": git_commit(),
            "data_manifest_hash": self.manifest_hash,
            "data_summary": summary,
            "device": str(self.device),
            "precision": self.precision,
            "world_size": self.info.world_size,
            "num_workers": self.num_workers,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
        }
        atomic_write_text(self.run_dir / RUN_FILES["run"], json.dumps(to_jsonable(info), indent=2, default=str))

    # ---- training ------------------------------------------------------------------------

    def fit(self) -> FinetuneResult:
        cfg = self.cfg
        if self.resume_state is None:
            self._write_run_info()
        elif self.info.is_main:
            save_config(cfg, self.run_dir / RUN_FILES["config"])
        if self.stopped or self.start_epoch >= cfg.epochs:
            log.info("run %s already finished (%s); nothing to do", self.run_dir, self.stopped or "all epochs done")
        else:
            log.info(
                "training %s (%s) on %s, %s, %d train / %d val images, %d epochs, batch %d, %d px -> %s",
                cfg.model,
                f"pretrained={cfg.pretrained}",
                self.device,
                self.precision,
                len(self.splits.train),
                len(self.splits.val),
                cfg.epochs,
                cfg.batch_size,
                cfg.image_size,
                self.run_dir,
            )
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                if self.stopped:
                    break
                self._epoch(epoch)
            if not self.stopped:
                self.stopped = "completed"
        finally:
            if self.tb is not None:
                self.tb.close()
        if self.info.is_main:  # feature statistics of the best weights: the scorer's OOD check (medxray.ood)
            stats_for_run(
                self.run_dir / RUN_FILES["best"],
                self.splits.train,
                self.splits.val,
                device=self.device,
                batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                num_workers=self.num_workers,
            )
        mdist.barrier(self.info)
        return FinetuneResult(
            run_dir=self.run_dir,
            best_checkpoint=self.run_dir / RUN_FILES["best"],
            last_checkpoint=self.run_dir / RUN_FILES["last"],
            best_epoch=self.best.best_epoch,
            best_val_auroc=self.best.best_auroc,
            epochs_completed=len(self.history),
            stopped_reason=self.stopped or "",
            history=self.history,
            label_names=self.label_names,
            data_summary=dict(getattr(self.splits, "summary", {}) or {}),
        )

    def _train_loader(self, epoch: int) -> torch.utils.data.DataLoader:
        from torch.utils.data import DistributedSampler

        cfg = self.cfg
        sampler = DistributedSampler(
            self.splits.train,
            num_replicas=self.info.world_size,
            rank=self.info.rank,
            shuffle=True,
            seed=cfg.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        seed = cfg.seed * 1_000_003 + epoch
        return make_loader(
            epoch_dataset(self.splits.train, seed),
            batch_size=cfg.batch_size,
            sampler=sampler,
            drop_last=True,
            seed=seed,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _epoch(self, epoch: int) -> None:
        """Train one epoch (0-based ``epoch``), validate, track the best, step the schedule, write.

        The learning rate recorded is the one the epoch trained with (read before the scheduler
        steps); early stopping only ends a run that has epochs left.
        """
        t0 = time.perf_counter()
        train = self._train_epoch(epoch)
        t_train = time.perf_counter() - t0
        val = self._validate()
        self.best = self.best.update(epoch + 1, val.score, val.mean_auroc)
        lr = self.optimizer.param_groups[0]["lr"]
        self._step_scheduler(val.loss)
        row = self._history_row(epoch, train, val, lr, t_train, time.perf_counter() - t0)
        self.history.append(to_jsonable(row))
        if self.best.should_stop and epoch + 1 < self.cfg.epochs:
            self.stopped = f"early stopping: no better val mean AUROC for {self.best.bad_epochs} epochs"
        if self.info.is_main:
            self._write_epoch(epoch + 1, row, val)
        self._log_epoch(row, train, val)
        mdist.barrier(self.info)

    def _validate(self) -> ValidationResult:
        """Score the validation set with the plain module (DDP's forward may run collectives, and
        shards differ in size) after rank 0's BatchNorm buffers are broadcast."""
        cfg = self.cfg
        mdist.broadcast_buffers(self.model, self.info)
        val = predict_dataset(
            self.model,
            self.splits.val,
            device=self.device,
            precision=self.precision,
            batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
            channels_last=cfg.channels_last,
            num_workers=self.num_workers,
            info=self.info,
        )
        aurocs = auroc_per_class(val["probs"], val["labels"], val["masks"])
        finite = [a for a in aurocs if math.isfinite(a)]
        mean_auroc = float(np.mean(finite)) if finite else float("nan")
        return ValidationResult(loss=val["loss"], aurocs=tuple(aurocs), mean_auroc=mean_auroc, predictions=val)

    def _step_scheduler(self, val_loss: float) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_loss)
        elif self.scheduler is not None:
            self.scheduler.step()

    def _history_row(
        self,
        epoch: int,
        train: Mapping[str, float],
        val: ValidationResult,
        lr: float,
        t_train: float,
        t_epoch: float,
    ) -> dict[str, Any]:
        """One line of ``metrics.jsonl`` / the run's history (epoch counted from 1, times in seconds)."""
        pred = val.predictions
        return {
            "epoch": epoch + 1,
            "train_loss": train["loss"],
            "val_loss": val.loss,
            "val_mean_auroc": val.mean_auroc,
            "val_auroc": dict(zip(self.label_names, val.aurocs)),
            "lr": lr,
            "train_images": train["images"],
            "train_images_per_s": train["images"] / max(t_train, 1e-9),
            "epoch_time_s": t_epoch,
            "val_images": len(self.splits.val),
            "val_images_scored": len(pred["names"]),
            "val_images_unique": len(set(pred["index"].tolist())),
            "best": self.best.improved,
            "world_size": self.info.world_size,
        }

    def _write_epoch(self, epoch: int, row: Mapping[str, Any], val: ValidationResult) -> None:
        """Rank 0's files for completed ``epoch`` (1-based): ``best.pt`` and ``val_predictions.csv``
        when it is the best, ``last.pt`` (keeping ``last.prev.pt``), a ``metrics.jsonl`` line, TensorBoard."""
        metrics = {
            "val_mean_auroc": val.mean_auroc,
            "val_auroc": row["val_auroc"],
            "val_loss": val.loss,
            "epoch": epoch,
            "selected_by": val.selected_by,
        }
        if self.best.improved:
            save_checkpoint(self.run_dir / RUN_FILES["best"], self.model.state_dict(), self.metadata(epoch, metrics))
            self._write_val_predictions(val.predictions)
        best_meta = {"val_mean_auroc": self.best.best_auroc, "best_epoch": self.best.best_epoch}
        save_training_checkpoint(
            self.run_dir,
            self.model.state_dict(),
            self.metadata(epoch, {**metrics, **best_meta}),
            self._training_state(epoch),
            keep_previous=self.last_is_good,
        )
        self.last_is_good = True
        with open(self.run_dir / RUN_FILES["metrics"], "a") as fh:
            fh.write(json_line(row) + "\n")
        if self.tb is not None:
            for k in ("train_loss", "val_loss", "val_mean_auroc", "lr", "train_images_per_s"):
                self.tb.add_scalar(k, row[k], epoch)

    def _log_epoch(self, row: Mapping[str, Any], train: Mapping[str, float], val: ValidationResult) -> None:
        log.info(
            "epoch %d/%d  train loss %.4f  val loss %.4f  val mean AUROC %.4f%s  lr %.2g  %.1f img/s  %.0fs",
            row["epoch"],
            self.cfg.epochs,
            train["loss"],
            val.loss,
            val.mean_auroc,
            " (best)" if self.best.improved else "",
            row["lr"],
            row["train_images_per_s"],
            row["epoch_time_s"],
        )
        if self.stopped:
            log.info("%s (best epoch %d)", self.stopped, self.best.best_epoch)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        loader = self._train_loader(epoch)
        steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        self.net.train()
        if cfg.freeze_bn:
            bn_eval(self.model)
        bar = _progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", enabled=cfg.progress and self.info.is_main)
        loss_sum, n_images, t_start = 0.0, 0, time.perf_counter()
        try:
            for step, batch in enumerate(loader):
                if step >= steps:
                    break
                x = batch["image"]
                value = train_step(
                    self.net,
                    x,
                    batch["label"],
                    batch["mask"],
                    self.optimizer,
                    self.scaler,
                    device=self.device,
                    precision=self.precision,
                    channels_last=cfg.channels_last,
                    pos_weight=self.pos_weight,
                    grad_clip_norm=cfg.grad_clip_norm,
                    check=functools.partial(self._check_loss, epoch, step),
                )
                loss_sum += value * x.shape[0]
                n_images += x.shape[0]
                if bar is not None:
                    rate = n_images * self.info.world_size / max(time.perf_counter() - t_start, 1e-9)
                    bar.set_postfix(loss=f"{loss_sum / n_images:.4f}", img_s=f"{rate:.1f}", refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        # Mean training loss over all ranks' images.
        parts = mdist.all_gather_objects((loss_sum, n_images), self.info)
        total_loss, total_n = sum(p[0] for p in parts), sum(p[1] for p in parts)
        return {"loss": total_loss / max(1, total_n), "images": float(total_n)}

    def _check_loss(self, epoch: int, step: int, value: float) -> None:
        # Every rank takes the same branch, so none is left waiting in a collective.
        if not mdist.all_true(math.isfinite(value), self.info):
            self._diverged(epoch, step, value)

    def _diverged(self, epoch: int, step: int, value: float) -> None:
        last = self.run_dir / RUN_FILES["last"]
        good_epoch = self.start_epoch if not self.history else self.history[-1]["epoch"]
        kept = (
            f"the last good checkpoint {last} (epoch {good_epoch}) "
            f"is kept; lower --lr (or use --precision fp32) and resume with --resume {self.run_dir}"
            if last.exists()
            else "no epoch had completed, so there is no checkpoint; lower --lr and start again"
        )
        raise TrainingDivergedError(
            f"training loss became non-finite ({value}) at epoch {epoch + 1}, batch {step + 1}; "
            f"the run stopped and {kept}"
        )

    def _training_state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": to_jsonable(self.scheduler.state_dict()) if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "rng": rng_states(self.device),
            "history": self.history,
            **self.best.to_state(),
            "stopped": self.stopped,
            "config": self.cfg.to_dict(),
        }

    def _write_val_predictions(self, val: Mapping[str, Any]) -> None:
        with atomic_output(self.run_dir / RUN_FILES["val_predictions"], "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["index", "name"] + [f"p_{n}" for n in self.label_names] + [f"y_{n}" for n in self.label_names])
            for i, name, p, y, m in zip(val["index"], val["names"], val["probs"], val["labels"], val["masks"]):
                ys = ["" if mk == 0 else int(v) for v, mk in zip(y, m)]
                w.writerow([int(i), name] + [f"{v:.6f}" for v in p] + ys)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr)
