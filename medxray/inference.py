"""Predictor: a medxray checkpoint -> batched probabilities and CAMs, on the fastest backend here.

Backends (``backend=``):

* ``"torch"``: eager PyTorch. On CUDA and on CPUs with native BF16 (AVX512-BF16 / AMX) it runs
  under bf16 autocast, on CPU also in channels_last; elsewhere fp32.
* ``"openvino"``: the model converted once at load time (features + logits as two outputs) and
  compiled for the CPU, in bf16 where the CPU has it. Measured here for densenet121 224x224
  bs 16 it is 2-7x faster than eager torch (see bench/score_dicom.py).
* ``"auto"``: torch on CUDA; OpenVINO on CPU when it is installed and converts; else torch.

Every reduced-precision backend is checked against fp32 eager at load time on two synthetic
inputs: if probabilities differ by more than :data:`PROB_TOLERANCE` the predictor falls back to
fp32 (with a warning) rather than silently scoring worse.

Inputs are 2-D float arrays in [0, 1] (:func:`medxray.dicom.read_dicom` ``.pixels``) and go
through THE deterministic transform list of :mod:`medxray.data.transforms`, so a checkpoint
scores an image here exactly as evaluation does. A predictor is safe to share between threads:
the torch model is only read, and each thread gets its own OpenVINO infer request.

The backends themselves (eager torch; OpenVINO conversion, IR cache, compilation, per-thread
infer requests) live in :mod:`medxray.backends`; the Predictor chooses one, verifies it against
fp32 eager, batches, and adds the OOD distances and maps.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence, cast, overload

import numpy as np
import torch

from medxray.backends import BACKENDS, PRECISIONS, Backend, OpenVINOBackend, TorchBackend  # tables re-exported
from medxray.backends.openvino import load_or_convert, openvino_cache_dir
from medxray.checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint
from medxray.checkpoint_meta import CheckpointMeta
from medxray.errors import CheckpointError, ConfigError, InputShapeError
from medxray.fileio import file_sha256
from medxray.hardware import cpu_has_native_bf16, resolve_device
from medxray.modelinput import model_input
from medxray.ood import OODStats, pooled, stats_from_checkpoint

if TYPE_CHECKING:
    from medxray.models.densenet import DenseNet

log = logging.getLogger(__name__)

PROB_TOLERANCE = 0.01


# ---------------------------------------------------------------------------------------------
# network input
# ---------------------------------------------------------------------------------------------


def preprocess(image: np.ndarray, image_size: int) -> torch.Tensor:
    """(3, S, S) float32 network input for one 2-D image: the input contract
    :func:`medxray.modelinput.model_input` as a tensor (uint8 / uint16 scaled by bit depth, float
    in [0, 1]; raises :class:`medxray.errors.ImageValueError` / ``InputShapeError`` otherwise)."""
    return torch.from_numpy(model_input(image, image_size))


# ---------------------------------------------------------------------------------------------
# Predictor
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Prediction:
    """What :meth:`Predictor.run` returns for a preprocessed batch of N images.

    * ``probabilities``: (N, C) float32, the sigmoid of the logits, one column per
      :attr:`Predictor.label_names` entry (multi-label, as in CheXNet, Rajpurkar et al. 2017);
    * ``ood``: (N,) Mahalanobis distances of the pooled last feature map to the training features
      (:class:`medxray.ood.OODStats`, Lee et al. 2018; compare with ``Predictor.ood.threshold``),
      or None when not asked for or when the checkpoint has no OOD statistics;
    * ``maps``: (N, K, S, S) float32 in [0, 1] at the network input size S
      (:func:`medxray.cam.compute_maps`), or None when not asked for;
    * ``map_classes``: the K column indices (into ``probabilities``) of ``maps``; () without maps;
    * ``map_method``: the :data:`medxray.cam.MAP_METHODS` key of ``maps``, or None.

    Raises ValueError when the shapes disagree.
    """

    probabilities: np.ndarray
    ood: np.ndarray | None = None
    maps: np.ndarray | None = None
    map_classes: tuple[int, ...] = ()
    map_method: str | None = None

    def __post_init__(self) -> None:
        probs = self.probabilities
        if not isinstance(probs, np.ndarray) or probs.ndim != 2:
            raise ValueError(f"Prediction.probabilities must be (N, C), got {np.shape(probs)}")
        n = probs.shape[0]
        if self.ood is not None and np.shape(self.ood) != (n,):
            raise ValueError(f"Prediction.ood must be ({n},), got {np.shape(self.ood)}")
        object.__setattr__(self, "map_classes", tuple(int(c) for c in self.map_classes))
        k = len(self.map_classes)
        if self.maps is None:
            if k or self.map_method is not None:
                raise ValueError("Prediction: map_classes / map_method without maps")
        elif np.ndim(self.maps) != 4 or np.shape(self.maps)[:2] != (n, k):
            raise ValueError(f"Prediction.maps must be ({n}, {k}, S, S), got {np.shape(self.maps)}")

    def __len__(self) -> int:
        return int(self.probabilities.shape[0])


class Predictor:
    """Batched probabilities (and CAMs) from one checkpoint; see the module docstring."""

    def __init__(
        self,
        model: DenseNet | Callable[[], DenseNet],
        metadata: Mapping[str, Any] | CheckpointMeta,
        *,
        device: str | torch.device = "auto",
        backend: str = "auto",
        precision: str = "auto",
        batch_size: int = 16,
        num_threads: int | None = None,
        verify: bool = True,
        source: str | None = None,
        ood: OODStats | None = None,
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        from medxray.modelinput import check_preprocessing

        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.meta = CheckpointMeta.from_dict(metadata)
        self.metadata = self.meta.to_dict()
        self.image_size = check_preprocessing(self.meta.preprocessing)
        self.architecture = self.meta.architecture or "unknown"
        names = list(self.meta.label_names)
        # ``model`` may be a builder (from_checkpoint): then ``weights`` (its state dict) names it
        # and the torch module is built only when something needs it (eager torch, a conversion,
        # gradient maps); a cached OpenVINO model scoring without maps never builds it (~0.1-0.3 s)
        self._model: DenseNet | None = cast("DenseNet", model) if isinstance(model, torch.nn.Module) else None
        self._build_model: Callable[[], DenseNet] | None = None if self._model is not None else model
        self._weights = None if self._model is not None else weights
        if self._model is not None:
            n_out = int(self._model.classifier.out_features)
        elif weights is not None and isinstance(weights.get("classifier.weight"), torch.Tensor):
            n_out = int(weights["classifier.weight"].shape[0])
        else:  # a builder without weights: built now
            assert self._build_model is not None
            self._model = self._build_model()
            n_out = int(self._model.classifier.out_features)
        if not names:
            names = [f"class_{i}" for i in range(n_out)]
        if len(names) != n_out:
            raise CheckpointError(f"checkpoint lists {len(names)} label names but the model has {n_out} outputs")
        self.label_names: list[str] = names
        self.thresholds: dict[str, float] = {n: self.meta.threshold(n) for n in names}
        self.model_version = self.meta.version_label
        self.model_name = self.meta.display_name
        from medxray.cam import DEFAULT_MAP_METHOD, MAP_METHODS

        # the map method the checkpoint's localisation figures were measured with (evaluate writes it)
        stored = self.meta.cam_method
        self.cam_method = stored if stored in MAP_METHODS else DEFAULT_MAP_METHOD
        self.batch_size = max(1, int(batch_size))
        self.source = source
        self.ood = ood  # the checkpoint's OOD feature statistics (medxray.ood), or None
        self.device = resolve_device(device)
        # Only OpenVINO takes a thread count per model; torch's intra-op pool is process-wide, so
        # the caller that owns the process (the scorer) sets and restores it around its run.
        self._num_threads = num_threads
        if self._model is not None:
            self._model = self._model.eval().to(self.device)
        self._backend: Backend = self._choose(backend, precision)
        if verify and self.precision != "int8" and not (self.backend == "torch" and self.precision == "fp32"):
            self._verify_or_fall_back()
        log.info(
            "predictor: %s %s on %s, backend %s (%s)",
            self.architecture,
            self.model_version,
            self.device,
            self.backend,
            self.precision,
        )

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike | Checkpoint,
        device: str | torch.device = "auto",
        backend: str = "auto",
        **kwargs: Any,
    ) -> "Predictor":
        """Load (weights_only) and build; raises :class:`CheckpointError` for an unusable checkpoint."""
        ckpt = path if isinstance(path, Checkpoint) else load_checkpoint(path)
        from medxray.modelinput import check_preprocessing

        check_preprocessing(ckpt.meta.preprocessing)  # fail before building the model
        src = None if isinstance(path, Checkpoint) else str(path)
        kwargs.setdefault("ood", stats_from_checkpoint(ckpt))
        # built when first needed (see __init__); its errors (weights that do not fit the
        # architecture) are CheckpointError then; a cached conversion proves they fit. Weights
        # stored in another float type than the model's float32 are hashed as the built model's.
        fp32 = all(
            not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32)
            for t in ckpt.state_dict.values()
        )
        return cls(
            partial(model_from_checkpoint, ckpt),
            ckpt.metadata,
            device=device,
            backend=backend,
            source=src,
            weights=ckpt.state_dict if fp32 else None,
            **kwargs,
        )

    @property
    def model(self) -> DenseNet:
        """The torch module (eval mode, on :attr:`device`), built on first use."""
        if self._model is None:
            assert self._build_model is not None
            self._model = self._build_model().eval().to(self.device)
        return self._model

    @model.setter
    def model(self, model: DenseNet) -> None:
        self._model = model

    def _model_source(self) -> DenseNet | Callable[[], DenseNet]:
        """The module when built, else a builder of :attr:`model` (for a backend that needs the
        module only to convert it)."""
        return self._model if self._model is not None else (lambda: self.model)

    def _choose(self, backend: str, precision: str) -> Backend:
        if backend == "openvino" and self.device.type != "cpu":
            raise ConfigError("the openvino backend runs on the CPU; use --device cpu or the torch backend")
        if backend == "auto":
            backend = "torch" if self.device.type == "cuda" else "openvino"
        want_int8 = precision in ("auto", "int8")  # int8 is used only where medxray.quantize's gate passed
        if precision in ("auto", "int8"):
            if self.device.type == "cuda":
                precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
            else:
                precision = "bf16" if cpu_has_native_bf16() else "fp32"
        if backend == "openvino":
            try:
                ov = OpenVINOBackend(
                    self._model_source(),
                    weights=self._weights,
                    architecture=self.architecture,
                    image_size=self.image_size,
                    precision=precision,
                    want_int8=want_int8,
                    num_threads=self._num_threads,
                )
            except Exception as exc:  # not installed, or an op it cannot convert
                log.warning(
                    "OpenVINO backend unavailable (%s: %s); using torch",
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                )
            else:
                if want_int8 and ov.precision != "int8":
                    log.info("int8 not used (%s); running %s", ov.int8_note, ov.precision)
                return ov
        return TorchBackend(self.model, self.device, precision)

    @property
    def backend(self) -> str:
        """The backend running the forward passes: "torch" or "openvino" (:mod:`medxray.backends`)."""
        return self._backend.name

    @property
    def precision(self) -> str:
        """The precision of the forward passes: "fp32", "bf16" or "int8" (OpenVINO only)."""
        return self._backend.precision

    @property
    def int8_note(self) -> str:
        """Why the int8 model is not used ("" when it is, or when it was not asked for)."""
        return self._backend.int8_note if isinstance(self._backend, OpenVINOBackend) else ""

    @property
    def weights_key(self) -> str | None:
        """The weight hash naming this model's cached OpenVINO IRs (None off the OpenVINO backend)."""
        return self._backend.key if isinstance(self._backend, OpenVINOBackend) else None

    @property
    def cache_dir(self) -> Path | None:
        """Where this predictor's converted models are cached (:func:`openvino_cache_dir`)."""
        return openvino_cache_dir()

    def openvino_fp32_model(self) -> Any:
        """The fp32 OpenVINO model (logits, features) of these weights, from the cache or converted
        (:func:`medxray.backends.openvino.load_or_convert`)."""
        return load_or_convert(self._model_source(), self.architecture, self.image_size, self._weights)[0]

    def _verify_or_fall_back(self) -> None:
        """Compare with fp32 eager on two fixed synthetic radiograph-like inputs.

        For OpenVINO the result is cached next to the converted model (same weights, OpenVINO
        version, precision and CPU flags give the same numbers): the fp32 eager reference pass
        costs seconds of one-time kernel set-up, which a nightly run should not pay every time.
        """
        record = self._backend.verification_record()
        diff: float | None = None
        if record is not None and record.is_file():
            try:
                diff = float(json.loads(record.read_text(encoding="utf-8"))["max_abs_prob_diff"])
            except (OSError, ValueError, KeyError, TypeError):
                diff = None
        if diff is None:
            x = self._synthetic_batch()
            with torch.inference_mode():
                ref = _sigmoid(self.model(x.to(self.device)).float().cpu().numpy())
            got = _sigmoid(self.forward(x)[0])
            diff = float(np.abs(got - ref).max())
            if record is not None:
                try:
                    record.write_text(json.dumps({"max_abs_prob_diff": diff}), encoding="utf-8")
                except OSError:
                    pass
        if diff > PROB_TOLERANCE:
            log.warning(
                "backend %s/%s differs from fp32 by %.4f (> %.2f); falling back to torch fp32",
                self.backend,
                self.precision,
                diff,
                PROB_TOLERANCE,
            )
            self.model = self.model.to(memory_format=torch.contiguous_format)
            self._backend = TorchBackend(self.model, self.device, "fp32")
        self.verified_max_diff = diff

    def _synthetic_batch(self) -> torch.Tensor:
        s = 128
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        a = 0.2 + 0.6 * np.exp(-((xx - 0.3) ** 2 + (yy - 0.5) ** 2) / 0.05)
        b = np.clip(0.5 + 0.4 * np.sin(6 * xx) * np.cos(4 * yy), 0, 1)
        return torch.stack([preprocess(a, self.image_size), preprocess(b, self.image_size)])

    # -- core forward ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor, want_features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (N, C) and, when asked, the feature map (N, F, h, w) for a preprocessed batch."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise InputShapeError(f"expected a batch (N, 3, S, S), got {tuple(x.shape)}")
        outs_l, outs_f = [], []
        for i in range(0, x.shape[0], self.batch_size):
            chunk = x[i : i + self.batch_size]
            lg, ft = self._backend.infer(chunk, want_features)
            outs_l.append(lg)
            if ft is not None:
                outs_f.append(ft)
        logits = np.concatenate(outs_l) if outs_l else np.zeros((0, len(self.label_names)), np.float32)
        feats = np.concatenate(outs_f) if outs_f else None
        return logits, feats

    # -- public API --------------------------------------------------------------------------

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """List of 2-D images -> (N, 3, S, S) float32 batch (:func:`medxray.modelinput.model_input` each).

        Each image is uint8 / uint16 (scaled by its bit depth) or float in [0, 1]; anything else
        raises :class:`medxray.errors.ImageValueError` (a float image in [0, 255]: divide by 255).
        """
        if not len(images):
            return torch.zeros((0, 3, self.image_size, self.image_size))
        return torch.stack([preprocess(img, self.image_size) for img in images])

    def run(
        self,
        x: torch.Tensor,
        *,
        ood: bool = False,
        maps: bool | str | Sequence[int | str] = False,
        method: str | None = None,
        wanted: np.ndarray | None = None,
    ) -> Prediction:
        """Score a preprocessed batch (N, 3, S, S): a :class:`Prediction`.

        ``ood=True`` adds the OOD distances (:meth:`ood_distance`; None without statistics).
        ``maps``: False (none), True (every finding), or the findings (column indices or names)
        to compute maps for, with ``method`` (default: the checkpoint's ``cam_method``) and
        ``wanted`` (N, K) bool limiting which (image, finding) maps are computed, as in
        :meth:`maps_tensor`. Without maps: one forward pass per chunk of ``batch_size`` images on
        the predictor's backend. With maps on the torch backend, and for ``cam`` on any backend,
        probabilities, OOD features and maps all come from the map pass; on OpenVINO with a
        gradient method the probabilities come from OpenVINO (the numbers the scorer writes) and
        the maps from an eager torch pass (OpenVINO has no gradients).
        Raises :class:`~medxray.errors.InputShapeError` for a batch of another shape and
        :class:`~medxray.errors.ConfigError` for an unknown finding or map method.
        """
        if maps is False:
            if wanted is not None:
                raise ConfigError("wanted selects maps: give the maps= findings too")
            logits, feats = self.forward(x, want_features=ood and self.ood is not None)
            return Prediction(_sigmoid(logits), self.ood_distance(feats) if ood else None)
        from medxray.cam import check_method

        name = check_method(method or self.cam_method)
        chosen = None if maps is True else [maps] if isinstance(maps, str) else list(maps)
        cls = self.class_indices(chosen)
        cls = list(range(len(self.label_names))) if cls is None else cls
        if self.backend == "torch" or name == "cam":
            logits, feats, m = self._map_pass(x, cls, name, wanted, want_features=ood and self.ood is not None)
            probs, distances = _sigmoid(logits), self.ood_distance(feats)
        else:
            first = self.run(x, ood=ood)
            probs, distances = first.probabilities, first.ood
            m = self._map_pass(x, cls, name, wanted, want_features=False)[2]
        return Prediction(probs, distances if ood else None, m, tuple(cls), name)

    @overload
    def predict_tensor(self, x: torch.Tensor, with_ood: Literal[False] = False) -> np.ndarray: ...
    @overload
    def predict_tensor(self, x: torch.Tensor, with_ood: Literal[True]) -> tuple[np.ndarray, np.ndarray | None]: ...
    @overload
    def predict_tensor(self, x: torch.Tensor, with_ood: bool) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]: ...
    def predict_tensor(
        self, x: torch.Tensor, with_ood: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (N, C) float32 for an already preprocessed batch: :meth:`run` without maps.

        ``with_ood=True`` returns ``(probs, ood)``: ``ood`` the (N,) OOD distances of
        :meth:`ood_distance` from the same forward pass, or None when the checkpoint has no OOD
        statistics. Kept for compatibility; new code calls :meth:`run`.
        """
        pred = self.run(x, ood=with_ood)
        return (pred.probabilities, pred.ood) if with_ood else pred.probabilities

    def ood_distance(self, feats: np.ndarray | None) -> np.ndarray | None:
        """Mahalanobis distances (N,) of feature maps (N, F, h, w) to the training features
        (:class:`medxray.ood.OODStats`; compare with ``self.ood.threshold``), or None without statistics."""
        if self.ood is None or feats is None:
            return None
        return self.ood.distance(pooled(feats))

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities (N, C), float32, one column per ``label_names`` entry."""
        return self.predict_tensor(self.preprocess(images))

    def class_indices(self, classes: Sequence[int | str] | None) -> list[int] | None:
        """Column indices for ``classes`` given as indices or finding names (None = all)."""
        if classes is None:
            return None
        out = []
        for c in classes:
            if isinstance(c, str):
                if c not in self.label_names:
                    raise ConfigError(f"unknown finding {c!r}; this model predicts {', '.join(self.label_names)}")
                out.append(self.label_names.index(c))
            else:
                out.append(int(c))
        return out

    @property
    def map_precision(self) -> str:
        """Precision of this predictor's maps (:func:`medxray.cam.compute_maps`): "bf16" (autocast +
        channels_last) where the predictor runs its model in bf16 or int8 on hardware with native
        bf16 (AVX512-BF16 / AMX CPUs, bf16 GPUs), else "fp32". Evaluation scores fp32 maps."""
        if self.precision not in ("bf16", "int8"):
            return "fp32"
        if self.device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_native_bf16() else "fp32"

    def maps_tensor(
        self,
        x: torch.Tensor,
        classes: Sequence[int | str] | None = None,
        method: str | None = None,
        *,
        wanted: np.ndarray | None = None,
    ) -> np.ndarray:
        """Maps (N, K, S, S) float32 in [0, 1] for a preprocessed batch (N, 3, S, S).

        These are :func:`medxray.cam.compute_maps` (THE map definition), in :attr:`map_precision`;
        ``method`` defaults to the checkpoint's ``cam_method``. Gradient methods run in eager torch
        whatever the backend (OpenVINO gives no gradients): one forward pass and batched backward
        passes per ``batch_size`` images; ``cam`` on an OpenVINO backend uses its feature map
        with the same arithmetic. ``wanted`` (N, K) bool limits which (image, class) maps are
        computed (the others are all 0). An all-zero wanted map means no positive evidence
        (:func:`medxray.cam.no_evidence_text`). Raises ConfigError for an unknown finding or method.
        """
        return self._map_pass(x, classes, method, wanted, want_features=False)[2]

    def _map_pass(
        self,
        x: torch.Tensor,
        classes: Sequence[int | str] | None,
        method: str | None,
        wanted: np.ndarray | None,
        want_features: bool,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Logits (N, C), the last feature map (N, F, h, w) when ``want_features`` (else None) and
        the maps (N, K, S, S), all from ONE forward pass per chunk of ``batch_size`` images."""
        from medxray.cam import check_method, compute_maps, maps_from_features

        name = check_method(method or self.cam_method)
        cls = self.class_indices(classes)
        cls = list(range(len(self.label_names))) if cls is None else cls
        n, size = int(x.shape[0]), (int(x.shape[-2]), int(x.shape[-1]))
        want = None if wanted is None else np.asarray(wanted, dtype=bool)
        if want is not None and want.shape != (n, len(cls)):
            raise ConfigError(f"wanted must be (images, classes) = ({n}, {len(cls)}), got {want.shape}")
        if n == 0 or not cls:
            logits, feats = (
                self.forward(x, want_features=want_features)
                if n
                else (np.zeros((0, len(self.label_names)), np.float32), None)
            )
            return logits, feats, np.zeros((n, len(cls), *size), np.float32)
        if name == "cam" and self.backend == "openvino":
            logits, feats = self.forward(x, want_features=True)
            assert feats is not None  # asked for
            weight = self.model.classifier.weight.detach().float().cpu()
            maps = maps_from_features(feats, weight, cls, size)[0]
            if want is not None:
                maps[~want] = 0.0
            return logits, feats if want_features else None, maps
        logits_p, feats_p, maps_p = [], [], []
        for i in range(0, n, self.batch_size):
            sub = None if want is None else want[i : i + self.batch_size]
            res = compute_maps(
                self.model,
                x[i : i + self.batch_size].to(self.device),
                cls,
                method=name,
                wanted=sub,
                precision=self.map_precision,
            )
            logits_p.append(res.logits.cpu().numpy())
            if want_features and res.features is not None:
                feats_p.append(res.features.cpu().numpy())
            maps_p.append(res.maps)
        feats = np.concatenate(feats_p) if want_features and feats_p else None
        return np.concatenate(logits_p), feats, np.concatenate(maps_p)

    @overload
    def predict_tensor_with_cams(
        self,
        x: torch.Tensor,
        classes: Sequence[int | str] | None = None,
        method: str | None = None,
        with_ood: Literal[False] = False,
    ) -> tuple[np.ndarray, np.ndarray]: ...
    @overload
    def predict_tensor_with_cams(
        self,
        x: torch.Tensor,
        classes: Sequence[int | str] | None = None,
        method: str | None = None,
        *,
        with_ood: Literal[True],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]: ...
    @overload
    def predict_tensor_with_cams(
        self,
        x: torch.Tensor,
        classes: Sequence[int | str] | None = None,
        method: str | None = None,
        with_ood: bool = False,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray | None]: ...
    def predict_tensor_with_cams(
        self,
        x: torch.Tensor,
        classes: Sequence[int | str] | None = None,
        method: str | None = None,
        with_ood: bool = False,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(probs, maps)``: probabilities (N, C) and the maps (N, K, S, S) of :meth:`maps_tensor`
        (``classes`` default: all C); ``with_ood=True`` adds a third value, the OOD distances (N,)
        or None. :meth:`run` with maps (one forward pass per chunk; see there for the backends).
        Kept for compatibility; new code calls :meth:`run`.
        """
        pred = self.run(x, ood=with_ood, maps=True if classes is None else classes, method=method)
        assert pred.maps is not None  # asked for
        return (pred.probabilities, pred.maps, pred.ood) if with_ood else (pred.probabilities, pred.maps)

    @overload
    def predict_with_cams(
        self,
        images: Sequence[np.ndarray],
        classes: Sequence[int | str] | None = None,
        method: str | None = None,
        with_ood: Literal[False] = False,
    ) -> tuple[np.ndarray, np.ndarray]: ...
    @overload
    def predict_with_cams(
        self,
        images: Sequence[np.ndarray],
        classes: Sequence[int | str] | None = None,
        method: str | None = None,
        *,
        with_ood: Literal[True],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]: ...
    @overload
    def predict_with_cams(
        self,
        images: Sequence[np.ndarray],
        classes: Sequence[int | str] | None = None,
        method: str | None = None,
        with_ood: bool = False,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray | None]: ...
    def predict_with_cams(
        self,
        images: Sequence[np.ndarray],
        classes: Sequence[int | str] | None = None,
        method: str | None = None,
        with_ood: bool = False,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Probabilities (N, C) and maps (N, K, S, S) in [0, 1] at the network input size S.

        ``classes`` are column indices or finding names (default: all C); see
        :meth:`predict_tensor_with_cams`.
        """
        return self.predict_tensor_with_cams(self.preprocess(images), classes, method, with_ood=with_ood)

    def positive(self, probs: np.ndarray) -> list[list[str]]:
        """Findings at or above their threshold, per row."""
        th = np.array([self.thresholds[n] for n in self.label_names], dtype=np.float32)
        return [[n for n, hit in zip(self.label_names, row) if hit] for row in (np.asarray(probs) >= th)]

    def describe(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "backend": self.backend,
            "precision": self.precision,
            "device": str(self.device),
            "image_size": self.image_size,
        }


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))).astype(np.float32)


def checkpoint_identity(path: str | os.PathLike) -> str:
    """A short content hash naming a checkpoint (used to refuse mixing runs of two models)."""
    return file_sha256(Path(path))[:16]
