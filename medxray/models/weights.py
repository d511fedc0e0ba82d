"""ImageNet initialisation from torchvision-format state dicts.

Every key is accounted for: legacy names are remapped, the head is kept when its shape fits the
model and re-initialised otherwise (logged), and anything else missing or unexpected is an error
that names the keys. Files load with ``weights_only=True`` only.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, TypeGuard

import torch

from medxray.errors import WeightsError
from medxray.models.variants import VARIANTS, get_variant
from medxray.torchfile import safe_torch_load

if TYPE_CHECKING:
    from medxray.models.densenet import DenseNet

log = logging.getLogger(__name__)

WEIGHTS_BASE_URL = "https://download.pytorch.org/models/"

# The ``pretrained`` value (``--pretrained``, ``TrainConfig.pretrained``) that means "random
# initialisation"; :func:`wants_pretrained` is the one test for it.
NO_PRETRAINED = "none"


def wants_pretrained(value: str | os.PathLike | None) -> TypeGuard[str | os.PathLike]:
    """False for no initial weights (None, ``""`` or :data:`NO_PRETRAINED` in any case), else True
    (``"imagenet"`` or a path to a torchvision-format state dict)."""
    return value is not None and str(value).lower() not in (NO_PRETRAINED, "")


# torchvision's released DenseNet files predate its current module names and spell dense-layer
# parameters "denselayer1.norm.1.weight" where the model has "denselayer1.norm1.weight".
# Group 1 = path up to the layer's sub-module kind, group 2 = its index, group 3 = the tensor.
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(weight|bias|running_mean|running_var|num_batches_tracked)$"
)
_HEAD_KEYS = ("classifier.weight", "classifier.bias")


def remap_legacy_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename legacy dense-layer keys to current ones; other keys pass through unchanged."""
    return {_LEGACY_KEY.sub(r"\1\2.\3", k): v for k, v in state_dict.items()}


def hub_checkpoint_dir() -> Path:
    """Where torch hub keeps downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_weights_path(name: str, *, download: bool = True, base_url: str | None = None) -> Path:
    """Path of torchvision's ImageNet file for ``name`` in the hub cache, downloading it if allowed.

    The download is checked against the SHA-256 prefix in torchvision's file name.
    """
    variant = get_variant(name)
    if variant.imagenet_file is None:
        have = ", ".join(n for n, v in VARIANTS.items() if v.imagenet_file)
        raise WeightsError(f"torchvision publishes no ImageNet weights for {name}; available for: {have}")
    folder = hub_checkpoint_dir()
    path = folder / variant.imagenet_file
    if path.is_file():
        return path
    url = (base_url or WEIGHTS_BASE_URL) + variant.imagenet_file
    offline_help = (
        f"ImageNet weights for {name} are not in the torch hub cache and could not be downloaded. "
        f"Put torchvision's file {variant.imagenet_file} (from {url}) into {folder}/ "
        f"(or set TORCH_HOME), or pass --pretrained PATH to a local state dict, or --pretrained none"
    )
    if not download:
        raise WeightsError(offline_help)
    hash_prefix = variant.imagenet_file.rsplit("-", 1)[-1].split(".")[0]
    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, path)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix, progress=False)
    except RuntimeError as exc:  # torch.hub raises RuntimeError on a hash mismatch
        path.unlink(missing_ok=True)
        raise WeightsError(f"downloaded {url} failed its integrity check ({exc}); try again") from None
    except Exception as exc:  # URLError, socket errors, HTTP errors: all mean "not reachable"
        path.unlink(missing_ok=True)
        raise WeightsError(f"{offline_help} (download error: {exc})") from None
    return path


def extract_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict, or one wrapped under "state_dict"/"model" (DDP "module." stripped)."""
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise WeightsError(
            f"{source} is not a state dict (a mapping of parameter names to tensors); "
            f"save one with torch.save(model.state_dict(), path)"
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def adapt_input_channels(conv0_weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Fit RGB stem filters to ``in_chans`` inputs.

    One channel: sum the RGB filters, so a gray image replicated to RGB and the single channel
    give the same response. Other counts: cycle the RGB filters and rescale by 3 / in_chans.
    """
    if in_chans == conv0_weight.shape[1]:
        return conv0_weight
    if in_chans == 1:
        return conv0_weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // conv0_weight.shape[1])
    w = conv0_weight.repeat(1, reps, 1, 1)[:, :in_chans]
    return w * (conv0_weight.shape[1] / in_chans)


def load_pretrained(model: DenseNet, name: str, pretrained: str | os.PathLike) -> None:
    """Initialise ``model`` (built as variant ``name``) from ImageNet weights or a local file."""
    if str(pretrained).lower() == "imagenet":
        path = imagenet_weights_path(name)
        source = f"ImageNet weights {path.name}"
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"unknown pretrained source {str(pretrained)!r}: use 'imagenet', 'none', or the path of an "
                f"existing torchvision-format .pth state dict"
            )
        source = str(path)
    state = extract_state_dict(safe_torch_load(path, what="pretrained weights"), source)
    state = remap_legacy_keys(state)

    own = model.state_dict()
    head_kept = all(k in state and state[k].shape == own[k].shape for k in _HEAD_KEYS)
    if not head_kept:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        log.info("new %d-way head, re-initialised (the weights' head does not fit)", model.classifier.out_features)
    if "features.conv0.weight" in state:
        state["features.conv0.weight"] = adapt_input_channels(state["features.conv0.weight"], model.in_chans)

    mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        detail = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:4])
        raise WeightsError(
            f"{source} does not fit {name}: {len(mismatched)} tensors have other shapes ({detail}); "
            f"is it a checkpoint of another architecture?"
        )
    result = model.load_state_dict(state, strict=False)
    allowed_missing = set() if head_kept else set(_HEAD_KEYS)
    # BatchNorm's step counter is bookkeeping that old torchvision files never stored.
    missing = [k for k in result.missing_keys if k not in allowed_missing and not k.endswith("num_batches_tracked")]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise WeightsError(
            f"{source} does not fit {name}: missing keys {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected keys {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}; "
            f"is it a checkpoint of another architecture?"
        )
    log.info("initialised %s from %s", name, source)
