"""Starting a run from a deployed checkpoint (``finetune --init-from C``), for small local sets.

* :func:`init_config`: the run takes the checkpoint's architecture (and input size unless one was
  given), with no ImageNet initialisation;
* :func:`load_init_weights`: the checkpoint's weights, the head row by finding name (a finding the
  checkpoint lacks keeps its fresh initialisation, and is logged);
* :func:`freeze`: the stem and the first N dense blocks fixed (``freeze_blocks``), and/or every
  BatchNorm's statistics and affine parameters fixed (``freeze_bn``; :func:`bn_eval` keeps them in
  eval mode after each ``model.train()``) - the usual choices when a few hundred local images must
  not wash out what the model learnt (Kornblith et al. 2019; Raghu et al. 2019 on transfer in
  medical imaging);
* :func:`check_site_lock`: a CSV manifest with a locked site test set beside it
  (:mod:`medxray.site.lockset`) may not train or validate on a locked patient or image.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from medxray.errors import ConfigError

log = logging.getLogger(__name__)


def init_config(cfg: Any) -> Any:
    """``cfg`` with the architecture of ``cfg.init_from`` and ``pretrained="none"``."""
    from medxray.checkpoint import load_checkpoint
    from medxray.models import NO_PRETRAINED

    meta = load_checkpoint(cfg.init_from).metadata
    arch = str(meta.get("architecture") or "")
    if cfg.model != arch:
        log.info("--init-from: using the checkpoint's architecture %s", arch)
    return dataclasses.replace(cfg, model=arch, pretrained=NO_PRETRAINED)


def load_init_weights(model: torch.nn.Module, path: str, label_names: Sequence[str]) -> None:
    """Copy the checkpoint's weights into ``model``; head rows are matched by finding name."""
    from medxray.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    src_names = list(ck.metadata.get("label_names") or [])
    sd = {k: v for k, v in ck.state_dict.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise ConfigError(
            f"--init-from {path}: weights do not fit the model (missing {missing[:3]}, "
            f"unexpected {list(unexpected)[:3]})"
        )
    w, b = ck.state_dict.get("classifier.weight"), ck.state_dict.get("classifier.bias")
    fresh = []
    with torch.no_grad():
        for i, n in enumerate(label_names):
            if n in src_names and w is not None:
                j = src_names.index(n)
                model.classifier.weight[i].copy_(w[j])
                if b is not None:
                    model.classifier.bias[i].copy_(b[j])
            else:
                fresh.append(n)
    if fresh:
        log.warning("--init-from: finding(s) new to the checkpoint start from a fresh head row: %s", ", ".join(fresh))


def freeze(model: torch.nn.Module, blocks: int, bn: bool) -> int:
    """Stop gradients to the stem and the first ``blocks`` dense blocks (and transitions before them),
    and with ``bn`` to every BatchNorm's weight and bias; returns the number of frozen parameters."""
    prefixes: list[str] = []
    if blocks > 0:
        prefixes += ["features.conv0", "features.norm0"]
        for k in range(1, blocks + 1):
            prefixes += [f"features.denseblock{k}.", f"features.transition{k}."]
    bn_names = {m for m, mod in model.named_modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)}
    frozen = 0
    for name, p in model.named_parameters():
        is_bn = bn and name.rpartition(".")[0] in bn_names
        if any(name.startswith(x) for x in prefixes) or is_bn:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def bn_eval(model: torch.nn.Module) -> None:
    """Put every BatchNorm layer in eval mode (running statistics used, not updated)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def check_site_lock(cfg: Any, splits: Any) -> None:
    """Refuse to train on a CSV manifest whose train/val rows hold locked site patients or images."""
    if cfg.dataset != "csv":
        return
    from medxray.site.lockset import check_unlocked, default_lock_path, load_lock

    csv_path = cfg.dataset_options.get("csv_path")
    if csv_path:
        f = Path(str(csv_path))
        if not f.is_absolute() and cfg.data_root:
            f = Path(cfg.data_root) / f
    elif cfg.data_root:
        f = Path(cfg.data_root)
        f = f if f.is_file() else f / "manifest.csv"
    else:
        return
    lock = load_lock(default_lock_path(f))
    if lock is None:
        return
    rows = []
    for part in (splits.train, splits.val):
        rec = getattr(part, "records", None)
        if rec is not None:
            rows += list(zip(rec.patients, rec.paths))
    n = check_unlocked(rows, lock, what="training")
    log.info("site lock %s checked: none of the %d train/val images is locked", lock.sha256[:12], n)
