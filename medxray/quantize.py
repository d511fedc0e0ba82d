"""int8 post-training quantisation for CPU inference (OpenVINO + NNCF), behind an accuracy gate.

:func:`quantize_predictor` takes a :class:`~medxray.inference.Predictor` on the OpenVINO backend,
quantises its fp32 graph with ``nncf.quantize`` (calibration: preprocessed network inputs,
e.g. images of the preprocessing cache or the validation split), and measures the gate at
conversion time:

* per-finding AUROC on the validation split within :data:`GATE_AUROC` (0.005) of fp32, for every
  finding with both classes present;
* probabilities on a check set: at most 1% of them (:data:`GATE_PROB_QUANTILE`) more than
  :data:`GATE_PROB` (0.02) from fp32, and none more than :data:`GATE_PROB_MAX` (0.05).

The probability criterion is a tail quantile plus a cap, not a plain maximum: the maximum over
N x C probabilities grows with the check set (one int8 model of a phantom-trained densenet121 at
64 px: 0.021-0.025 on 56 images, 0.034 on 600; 99.9th percentile 0.021), so a maximum of 0.02
judged the size of the check set rather than the model. bf16 on the same sets: max 0.003-0.005.
The AUROC criterion needs a validation split large enough to resolve it: one swapped
positive/negative pair moves a finding's AUROC by 1 / (positives x negatives) (0.0017 for 7
positives among 90 images, where the same int8 model moved AUROC by up to 0.010; by <= 0.0024 on
600 images).

The int8 IR and a JSON record of the gate (passed or not, why, the numbers) are cached next to
the fp32 IR, named by the same weight hash (``Predictor.cache_dir``). The
Predictor (precision ``auto`` or ``int8`` on OpenVINO) loads the int8 model only when that
record says it passed (:func:`load_int8`); otherwise it runs bf16/fp32 and logs the recorded
reason. The reference "fp32" is the same OpenVINO graph compiled with an f32 precision hint.

Must not import :mod:`medxray.inference` or :mod:`medxray.backends` (whose OpenVINO backend imports
this), the scoring, the app or the CLI;
nncf and openvino are imported lazily (the ``openvino`` extra).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

GATE_AUROC = 0.005
GATE_PROB = 0.02  # at the GATE_PROB_QUANTILE of |int8 - fp32| over the check set's probabilities
GATE_PROB_QUANTILE = 0.99
GATE_PROB_MAX = 0.05  # no probability may move more than this


@dataclass
class GateResult:
    """The accuracy gate of one quantisation (all numbers vs the fp32 graph)."""

    passed: bool
    reason: str
    max_auroc_drop: float = 0.0
    auroc_fp32: dict[str, float] = field(default_factory=dict)
    auroc_int8: dict[str, float] = field(default_factory=dict)
    max_prob_diff: float = 0.0
    n_val: int = 0
    n_check: int = 0
    tail_prob_diff: float = 0.0  # the GATE_PROB_QUANTILE quantile of |int8 - fp32| on the check set


def accuracy_gate(
    label_names: list[str],
    ref_val: np.ndarray,
    q_val: np.ndarray,
    y_val: np.ndarray,
    ref_check: np.ndarray,
    q_check: np.ndarray,
) -> GateResult:
    """Decide the gate from probabilities (N, C) of fp32 and int8 and 0/1 labels (N, C).

    AUROC: scikit-learn ``roc_auc_score`` per finding with both classes present in ``y_val``; each
    may move by at most :data:`GATE_AUROC`. Probabilities (check set, (M, C)): the
    :data:`GATE_PROB_QUANTILE` quantile of |int8 - fp32| at most :data:`GATE_PROB`, the maximum at most
    :data:`GATE_PROB_MAX`. Fails when no finding can be scored (a gate that measures nothing must not
    pass) or the check set is empty.
    """
    from sklearn.metrics import roc_auc_score

    a_ref, a_q = {}, {}
    for j, name in enumerate(label_names):
        y = np.asarray(y_val[:, j])
        if y.min() == y.max():
            continue
        a_ref[name] = float(roc_auc_score(y, ref_val[:, j]))
        a_q[name] = float(roc_auc_score(y, q_val[:, j]))
    drop = max((abs(a_ref[n] - a_q[n]) for n in a_ref), default=float("inf"))
    diffs = np.abs(np.asarray(ref_check, np.float64) - np.asarray(q_check, np.float64))
    pdiff = float(diffs.max()) if diffs.size else float("inf")
    ptail = float(np.quantile(diffs, GATE_PROB_QUANTILE)) if diffs.size else float("inf")
    why = []
    if not a_ref:
        why.append("no finding has both classes in the validation labels")
    elif drop > GATE_AUROC:
        worst = max(a_ref, key=lambda n: abs(a_ref[n] - a_q[n]))
        why.append(f"AUROC of {worst} moved by {drop:.4f} (> {GATE_AUROC})")
        n_pos = int(np.asarray(y_val[:, label_names.index(worst)]).sum())
        step = 1.0 / (n_pos * (len(y_val) - n_pos))  # one swapped positive/negative pair
        if 3 * step > GATE_AUROC:  # the tolerance is fewer than 3 swapped pairs: the split cannot resolve it
            why[-1] += (
                f" [{n_pos} positives among {len(y_val)} images: one swapped pair moves this AUROC by {step:.4f};"
                " a larger validation split resolves the gate]"
            )
    if ptail > GATE_PROB:
        why.append(
            f"more than {1 - GATE_PROB_QUANTILE:.0%} of the check set's probabilities differ from fp32 by more "
            f"than {GATE_PROB} ({GATE_PROB_QUANTILE:.0%} quantile {ptail:.4f})"
        )
    if pdiff > GATE_PROB_MAX:
        why.append(f"probabilities differ by up to {pdiff:.4f} on the check set (> {GATE_PROB_MAX})")
    passed = not why
    return GateResult(
        passed,
        "passed" if passed else "; ".join(why),
        drop if a_ref else float("nan"),
        a_ref,
        a_q,
        pdiff,
        int(len(y_val)),
        int(len(ref_check)),
        ptail,
    )


def _probs(compiled: Any, x: np.ndarray, batch: int = 16) -> np.ndarray:
    req = compiled.create_infer_request()
    out = [
        np.array(req.infer({0: np.ascontiguousarray(x[i : i + batch], np.float32)})[0], np.float64)
        for i in range(0, len(x), batch)
    ]
    return (1.0 / (1.0 + np.exp(-np.concatenate(out)))).astype(np.float32)


def _paths(key: str, cache: Path | None) -> tuple[Path, Path] | None:
    return None if cache is None else (Path(cache) / f"{key}.int8.xml", Path(cache) / f"{key}.int8.json")


def quantize_predictor(
    predictor: Any,
    calibration: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    check_x: np.ndarray,
    *,
    subset_size: int = 300,
    cache: Path | None = None,
) -> GateResult:
    """Quantise ``predictor``'s OpenVINO graph to int8, measure the gate, cache model + record.

    ``calibration``, ``val_x``, ``check_x``: preprocessed inputs (N, 3, S, S) float32 (as
    :meth:`Predictor.preprocess` makes them); ``val_y``: (N, C) 0/1 labels. Raises
    :class:`~medxray.errors.ConfigError` when the predictor is not on OpenVINO or nncf is missing.
    """
    from medxray.errors import ConfigError
    from medxray.hardware import openvino_core

    if predictor.backend != "openvino" or predictor.weights_key is None:
        raise ConfigError("int8 quantisation needs the OpenVINO backend (pip install 'medxray[openvino]')")
    try:
        import nncf  # noqa: F401  (missing nncf: the ConfigError below, before any work)
        import openvino as ov
    except ImportError as exc:
        raise ConfigError(
            f"int8 quantisation needs nncf and openvino ({exc}); pip install 'medxray[openvino]'"
        ) from None
    fp32 = predictor.openvino_fp32_model()
    q_model = quantize_model(fp32, calibration, subset_size=subset_size)
    core = openvino_core()
    cfg = {"INFERENCE_PRECISION_HINT": "f32"}
    ref_c, q_c = core.compile_model(fp32, "CPU", cfg), core.compile_model(q_model, "CPU", cfg)
    result = accuracy_gate(
        predictor.label_names,
        _probs(ref_c, val_x),
        _probs(q_c, val_x),
        np.asarray(val_y),
        _probs(ref_c, check_x),
        _probs(q_c, check_x),
    )
    (log.info if result.passed else log.warning)(
        "int8 gate: %s (max AUROC change %.4f, prob diff %.4f at the %.0f%% quantile, %.4f max)",
        result.reason,
        result.max_auroc_drop,
        result.tail_prob_diff,
        100 * GATE_PROB_QUANTILE,
        result.max_prob_diff,
    )
    paths = _paths(predictor.weights_key, cache if cache is not None else predictor.cache_dir)
    if paths is not None:
        xml, record = paths
        try:
            if result.passed:
                tmp = Path(tempfile.mkdtemp(prefix=".int8-", dir=xml.parent))
                try:
                    ov.save_model(q_model, str(tmp / xml.name), compress_to_fp16=False)
                    os.replace(tmp / xml.with_suffix(".bin").name, xml.with_suffix(".bin"))
                    os.replace(tmp / xml.name, xml)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            else:  # an int8 model of an earlier, passed gate for these weights is not kept beside a failed one
                for stale in (xml, xml.with_suffix(".bin")):
                    stale.unlink(missing_ok=True)
            record.write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            log.warning("cannot cache the int8 model in %s: %s", xml.parent, exc)
    return result


def quantize_model(fp32: Any, calibration: np.ndarray, *, subset_size: int = 300) -> Any:
    """The NNCF int8 graph of the OpenVINO model ``fp32``, calibrated on ``calibration`` (N, 3, S, S)
    float32 preprocessed inputs (at most ``subset_size`` of them). No gate: see
    :func:`quantize_predictor`. Raises ImportError without nncf."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    data = nncf.Dataset([np.ascontiguousarray(c[None], np.float32) for c in calibration])
    # Activation ranges: the min / max over the whole calibration set (NNCF's MINMAX), not NNCF's
    # default for activations (MEAN_MINMAX: the mean of each sample's min / max), which clips the rare
    # large activations that DenseNet's concatenated, BN-rescaled features carry. Measured on a
    # phantom-trained densenet121 at 64 px: mean |logit change| 0.36 -> 0.042, max probability change
    # 0.58 -> 0.034 on 600 images (tests/test_quantize_gate.py runs that model).
    advanced = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    return nncf.quantize(
        fp32,
        data,
        subset_size=min(subset_size, len(calibration)),
        target_device=nncf.TargetDevice.CPU,
        advanced_parameters=advanced,
    )


def load_int8(key: str, cache: Path | None) -> tuple[Any | None, str]:
    """(the int8 OpenVINO model, "") when a passed gate is recorded for weight hash ``key`` in ``cache``;
    else (None, why)."""
    paths = _paths(key, cache)
    if paths is None:
        return None, "no model cache directory (MEDXRAY_CACHE_DIR=off or unwritable)"
    xml, record = paths
    try:
        rec = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return (
            None,
            "no int8 model for these weights (run medxray.quantize.quantize_predictor once; no CLI command yet)",
        )
    except (OSError, ValueError) as exc:
        return None, f"unreadable int8 gate record ({type(exc).__name__})"
    if not rec.get("passed"):
        return None, f"int8 refused at conversion: {rec.get('reason', 'gate failed')}"
    try:
        from medxray.hardware import openvino_core

        return openvino_core().read_model(str(xml)), ""
    except Exception as exc:  # missing/damaged IR next to a passed record
        return None, f"int8 model unreadable ({type(exc).__name__})"
