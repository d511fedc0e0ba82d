"""The OpenVINO backend: the model converted once, cached as IR by weight hash, compiled for the CPU.

Conversion (``openvino.convert_model``, tracing the model) takes seconds, so the fp32 IR is
cached in :func:`openvino_cache_dir` under a hash of the architecture, input size, OpenVINO
version and weights (:func:`weights_key`); the int8 IR of :mod:`medxray.quantize` sits next to
it under the same key and is used only where its accuracy gate passed. One graph gives both
outputs, the logits and the last feature map (for the OOD distance and CAM), so the Predictor
never needs a second pass for them. Each calling thread gets its own infer request, so one
backend serves several threads. The compiled graph is cached too (OpenVINO's ``CACHE_DIR``, in
``compiled/<key>/``): compiling from it takes ~0.08 s against ~0.19 s, most of a start's model load.

Disk bound: the cache keeps the :data:`CACHE_MODELS` most recently used models (IR, int8 IR,
verification records, compiled blobs; ~2-3x the weights each); older ones are deleted when a
model is loaded, as are conversion leftovers (``.ov-*``, ``.int8-*``) older than an hour.

openvino is imported lazily (the ``openvino`` extra); building an :class:`OpenVINOBackend`
raises whatever the missing package or an unconvertible operation raises, and the Predictor
then falls back to torch. Must not import :mod:`medxray.inference`, the scoring, the app or the
CLI (they import it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union, cast

import numpy as np
import torch

from medxray.hardware import cpu_has_native_bf16, openvino_core

if TYPE_CHECKING:
    from medxray.models.densenet import DenseNet

log = logging.getLogger(__name__)

CACHE_MODELS = 8  # models (weight keys) the cache keeps; the least recently used beyond it are deleted
_STALE_TMP_S = 3600.0  # a conversion's temporary folder older than this was left by a killed process


def openvino_cache_dir() -> Path | None:
    """Where converted OpenVINO models are cached: $MEDXRAY_CACHE_DIR/openvino or ~/.cache/medxray/openvino.

    ``MEDXRAY_CACHE_DIR=off`` disables the cache; an unwritable location disables it silently.
    """
    base = os.environ.get("MEDXRAY_CACHE_DIR")
    if base and base.lower() in ("off", "0", "none"):
        return None
    root = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medxray"
    d = root / "openvino"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return d if os.access(d, os.W_OK) else None


def _key_of(name: str) -> str | None:
    head = name.split(".", 1)[0]
    return head if len(head) == 32 and all(c in "0123456789abcdef" for c in head) else None


def prune_cache(cache: Path, key: str, keep: int = CACHE_MODELS) -> list[str]:
    """Mark ``key`` used now (its .xml's mtime) and delete every entry of the keys beyond the
    ``keep`` most recently used, and conversion leftovers older than an hour; returns the keys
    deleted. Best effort: a file another process removes first, or one we cannot remove, is
    skipped (the cache is only ever an optimisation)."""
    try:
        os.utime(cache / f"{key}.xml")
    except OSError:
        pass
    last: dict[str, float] = {}
    paths: dict[str, list[Path]] = {}
    now = time.time()
    compiled = cache / "compiled"
    try:
        entries = list(cache.iterdir()) + (list(compiled.iterdir()) if compiled.is_dir() else [])
    except OSError:
        return []
    for p in entries:
        try:
            if p.name.startswith((".ov-", ".int8-")) and now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
                continue
            k = _key_of(p.name)
            if k is None:
                continue
            paths.setdefault(k, []).append(p)
            if p.suffix == ".xml" and p.parent == cache and not p.name.endswith(".int8.xml"):
                last[k] = max(last.get(k, 0.0), p.stat().st_mtime)
        except OSError:
            continue
    last[key] = now
    ranked = sorted(paths, key=lambda k: last.get(k, 0.0), reverse=True)
    dropped = ranked[max(1, keep) :]
    for k in dropped:
        for p in paths[k]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    if dropped:
        log.info("OpenVINO cache: kept the %d most recently used models, deleted %d", max(1, keep), len(dropped))
    return dropped


class _FeatureHead(torch.nn.Module):
    """Wrapper exported to OpenVINO: one graph with both logits and the CAM feature map."""

    def __init__(self, model: DenseNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(x)
        return self.model.forward_head(feats), feats


def weights_key(
    model: torch.nn.Module | Mapping[str, torch.Tensor], architecture: str, image_size: int, ov_version: str
) -> str:
    """32 hex digits naming the converted IRs of ``model`` (a module, or its state dict: the same
    key): SHA-256 of the architecture, input size S, OpenVINO version, graph layout and every
    tensor of the state dict (names and bytes)."""
    h = hashlib.sha256()
    h.update(f"{architecture}|{image_size}|{ov_version}|featurehead-v1".encode())
    tensors = model.state_dict() if isinstance(model, torch.nn.Module) else model
    for name, t in tensors.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


ModelSource = Union["DenseNet", Callable[[], "DenseNet"]]
"""A built model, or a function that builds it (called only when it is needed: a conversion)."""


def _built(model: ModelSource) -> DenseNet:
    return cast("DenseNet", model) if isinstance(model, torch.nn.Module) else model()


def load_or_convert(
    model: ModelSource, architecture: str, image_size: int, weights: Mapping[str, torch.Tensor] | None = None
) -> tuple[Any, str]:
    """(the fp32 OpenVINO model with outputs (logits, features) and input (-1, 3, S, S), its
    :func:`weights_key`): read from the cache, or converted once and cached (written to a temporary
    folder and moved in, the .xml last, so a present .xml means a complete entry; a damaged entry
    is converted again). ``model`` may be a builder, called only to convert, with ``weights`` (its
    state dict) naming it: a cache hit then needs no torch model at all. Raises ImportError
    without openvino, or what building or conversion raises."""
    import openvino as ov

    s = image_size
    cache = openvino_cache_dir()
    xml = None
    if weights is None:
        model = _built(model)
        weights = model.state_dict()
    key = weights_key(weights, architecture, image_size, ov.__version__)
    if cache is not None:
        xml = cache / f"{key}.xml"
        if xml.is_file() and xml.with_suffix(".bin").is_file():
            try:
                ov_model = openvino_core().read_model(str(xml))
                prune_cache(cache, key)
                return ov_model, key
            except Exception as exc:  # a damaged cache entry: convert again
                log.debug("ignoring OpenVINO cache entry %s: %s", xml.name, exc)
    wrapper = _FeatureHead(_built(model)).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Conversion traces the model; its tracer warnings are about our input-shape check
        # (a Python branch the trace freezes), which is exactly what we want frozen.
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(wrapper, example_input=torch.zeros(1, 3, s, s), input=[(-1, 3, s, s)])
    if xml is not None:
        try:
            tmp = Path(tempfile.mkdtemp(prefix=".ov-", dir=xml.parent))
            try:
                ov.save_model(ov_model, str(tmp / xml.name), compress_to_fp16=False)
                os.replace(tmp / xml.with_suffix(".bin").name, xml.with_suffix(".bin"))
                os.replace(tmp / xml.name, xml)  # the .xml appears last: its presence means complete
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            prune_cache(xml.parent, key)
        except OSError as exc:
            log.debug("cannot cache the OpenVINO model in %s: %s", xml.parent, exc)
    return ov_model, key


def compiled_cache_dir(key: str) -> Path | None:
    """OpenVINO's ``CACHE_DIR`` for the compiled graphs of model ``key`` (None without a cache)."""
    cache = openvino_cache_dir()
    if cache is None:
        return None
    d = cache / "compiled" / key
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return d


def compile_config(precision: str, num_threads: int | None) -> tuple[dict[str, Any], int]:
    """(OpenVINO CPU ``compile_model`` config, number of streams) for a graph run at ``precision``.

    "bf16" sets ``INFERENCE_PRECISION_HINT`` bf16; "fp32" and "int8" set f32 (an int8 graph's
    layers left in float run in f32, as the accuracy gate measured them). ``num_threads`` None:
    one latency-tuned stream; else ``num_threads`` streams of one thread each (see
    :class:`OpenVINOBackend`)."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    if num_threads is None:
        config["PERFORMANCE_HINT"] = "LATENCY"
        return config, 1
    streams = max(1, int(num_threads))
    config.update({"NUM_STREAMS": streams, "INFERENCE_NUM_THREADS": streams})
    return config, streams


def run_on_streams(reqs: Sequence[Any], arr: np.ndarray) -> list[Any]:
    """Run the batch ``arr`` (N, ...) float32 split into contiguous parts, one per infer request
    (one request per stream), all started before any is waited for; returns the requests used,
    in batch order (their outputs hold the parts' results)."""
    parts = np.array_split(arr, max(1, min(len(reqs), len(arr))))
    used = list(reqs[: len(parts)])
    for req, part in zip(used, parts):
        req.start_async({0: part})
    for req in used:
        req.wait()
    return used


class OpenVINOBackend:
    """``model`` converted (or read from the IR cache) and compiled for the CPU. ``model`` may be
    a builder named by ``weights`` (:func:`load_or_convert`): a cached model then builds no torch module.

    ``precision`` "bf16" or "fp32" is the ``INFERENCE_PRECISION_HINT`` (bf16 only where the CPU has
    it natively, the caller's choice); with ``want_int8`` the int8 IR of :mod:`medxray.quantize`
    replaces the graph when its gate passed (compiled with f32 for the layers it leaves in float,
    as the gate measured it) and :attr:`precision` becomes "int8"; :attr:`int8_note` says why not
    otherwise. ``num_threads`` (None: OpenVINO's default, one latency-tuned stream) compiles
    ``num_threads`` streams of one thread each (``NUM_STREAMS``), and :meth:`infer` splits a batch
    over them: the scorer's decode and overlay workers share the cores, and one stream of several
    threads waits at every layer for a thread a worker preempted (measured on 2 cores beside a
    background process: 16 img/s as one 2-thread stream vs 24-26 img/s as 2 streams).
    Raises ImportError without openvino, or what conversion / compilation raises.
    """

    name = "openvino"

    def __init__(
        self,
        model: ModelSource,
        *,
        architecture: str,
        image_size: int,
        precision: str,
        want_int8: bool = False,
        num_threads: int | None = None,
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        import openvino  # noqa: F401  (ImportError here, before any work, when it is not installed)

        core = openvino_core()
        ov_model, self.key = load_or_convert(model, architecture, image_size, weights)
        self.int8_note = ""
        if want_int8:
            from medxray.quantize import load_int8

            q_model, self.int8_note = load_int8(self.key, openvino_cache_dir())
            if q_model is not None:
                ov_model, precision = q_model, "int8"
        config, self.streams = compile_config(precision, num_threads)
        blobs = compiled_cache_dir(self.key)
        if blobs is not None:
            config["CACHE_DIR"] = str(blobs)
        self.precision = precision
        self.compiled: Any = core.compile_model(ov_model, "CPU", config)
        self._local = threading.local()

    def _requests(self) -> list[Any]:
        """This thread's infer requests, one per stream."""
        reqs = getattr(self._local, "requests", None)
        if reqs is None:
            reqs = [self.compiled.create_infer_request() for _ in range(self.streams)]
            self._local.requests = reqs
        return reqs

    def infer(self, x: torch.Tensor, want_features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (N, C) and, when asked, the feature map (N, F, h, w), float32, for a CPU batch
        (N, 3, S, S), on this thread's infer requests (:func:`run_on_streams`; outputs copied out
        of the requests' buffers)."""
        used = run_on_streams(self._requests(), np.ascontiguousarray(x.numpy(), dtype=np.float32))
        # np.concatenate copies the outputs out of the requests' buffers
        logits = np.concatenate([req.get_output_tensor(0).data for req in used]).astype(np.float32, copy=False)
        feats = (
            np.concatenate([req.get_output_tensor(1).data for req in used]).astype(np.float32, copy=False)
            if want_features
            else None
        )
        return logits, feats

    def verification_record(self) -> Path | None:
        """The JSON file next to the IR caching the comparison with fp32 eager: same weights,
        OpenVINO version, precision and CPU bf16 flags give the same numbers (None without a cache)."""
        cache = openvino_cache_dir()
        if cache is None:
            return None
        flags = "bf16native" if cpu_has_native_bf16() else "nobf16"
        return cache / f"{self.key}.{self.precision}.{flags}.verified.json"
