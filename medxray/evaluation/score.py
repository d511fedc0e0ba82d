"""One pass of a model over a dataset split: :func:`score_split` (probabilities, optional TenCrop
test-time augmentation, localisation records where the split has boxes) and :func:`ten_crop`.

The *score* stage of :func:`medxray.evaluation.run.evaluate` (see :mod:`medxray.evaluation.stages`),
also used by the site promotion check (:mod:`medxray.site.promote`). TenCrop as in CheXNet
(Rajpurkar et al. 2017): upscale by 256/224, four corners and the centre, and their mirror images.
Must not import training (:mod:`medxray.training`) or the evaluation job (:mod:`medxray.evaluation.run`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medxray.data.loading import IndexedDataset, make_loader
from medxray.evaluation.localisation import localise_batch
from medxray.hardware import autocast


def ten_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, S, S) -> (N*10, C, S, S): upscale by 1/0.875 (CheXNet's 256/224), take 4 corners +
    centre, and their mirror images."""
    big = int(round(size / 0.875))
    up = F.interpolate(x, size=(big, big), mode="bilinear", align_corners=False)
    o = big - size
    c = o // 2
    crops = [
        up[..., :size, :size],
        up[..., :size, o:],
        up[..., o:, :size],
        up[..., o:, o:],
        up[..., c : c + size, c : c + size],
    ]
    crops += [torch.flip(t, dims=(-1,)) for t in crops]
    return torch.stack(crops, 1).reshape(-1, *x.shape[1:])


@torch.no_grad()
def score_split(
    model: torch.nn.Module,
    dataset: Any,
    *,
    device: torch.device,
    precision: str,
    batch_size: int,
    tta: bool = False,
    boxes: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    label_names: Sequence[str] = (),
    cam_threshold: float = 0.5,
    num_workers: int = 0,
    progress: bool = False,
    cam_method: str | None = None,
) -> dict[str, Any]:
    """Probabilities for every image of ``dataset``; localisation records for images that have boxes.

    Returns ``probs``, ``labels``, ``masks`` as (N, C) arrays in dataset order, ``names``, and
    ``localisation`` (records of :func:`medxray.evaluation.localisation.localise_batch`, maps by
    ``cam_method``, None = :data:`medxray.cam.DEFAULT_MAP_METHOD`).
    ``tta``: average the sigmoid over TenCrop's ten crops (:func:`ten_crop`).
    """
    loader = make_loader(
        IndexedDataset(dataset),
        batch_size=batch_size,
        seed=0,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    model.eval()
    index_of = {n: i for i, n in enumerate(label_names)}
    probs, labels, masks, names, loc = [], [], [], [], []
    it: Any = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc="scoring", unit="batch", leave=False)
    for batch in it:
        fmt = torch.contiguous_format if precision == "fp32" else torch.channels_last
        x = batch["image"].to(device).contiguous(memory_format=fmt)
        size = x.shape[-1]
        with autocast(device, precision):
            feats = model.forward_features(x)
            logits = model.classifier(feats.float().mean(dim=(2, 3)))
            if tta:
                # one forward per crop position keeps memory at one batch's worth
                crops = ten_crop(x, size).reshape(x.shape[0], 10, *x.shape[1:])
                p = torch.stack(
                    [torch.sigmoid(model(crops[:, k].contiguous(memory_format=fmt)).float()) for k in range(10)]
                ).mean(0)
        p = p if tta else torch.sigmoid(logits.float())
        probs.append(p.cpu().numpy())
        labels.append(batch["label"].numpy())
        masks.append(batch["mask"].numpy())
        names.extend(batch["name"])
        if not boxes:
            continue
        loc.extend(
            localise_batch(
                model,
                x,
                [boxes.get(name, []) for name in batch["name"]],
                names=batch["name"],
                orig_sizes=batch["orig_size"],
                index_of=index_of,
                probs=p,
                method=cam_method,
                cam_threshold=cam_threshold,
            )
        )
    c = len(label_names)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0, c), dtype=np.float32)  # noqa: E731
    return {"probs": cat(probs), "labels": cat(labels), "masks": cat(masks), "names": names, "localisation": loc}
