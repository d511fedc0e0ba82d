"""Checkpoints written by earlier releases keep loading (issue 15: the restructure must not change the format).

``tests/data/main_463112c/best.pt`` was written by ``medxray finetune`` at commit 463112c (before the
package restructure): densenet_40_k12, 32 px, one epoch on a 120-image phantom. ``expected.json``
holds the fp32 probabilities that commit's code computed for a fixed input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent / "data" / "main_463112c"


def _fixed_input() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.linspace(0, 1, 64 * 64).reshape(64, 64) + 0.05 * rng.standard_normal((64, 64))
    return np.clip(img, 0, 1).astype(np.float32)


def test_checkpoint_from_before_the_restructure_loads_and_predicts_the_same():
    from medxray.checkpoint import load_checkpoint, model_from_checkpoint
    from medxray.data.transforms import check_preprocessing, preprocess_array
    from medxray.inference import Predictor

    expected = json.loads((HERE / "expected.json").read_text())
    ckpt = load_checkpoint(HERE / "best.pt")
    assert set(expected["metadata_keys"]) <= set(ckpt.metadata)
    check_preprocessing(ckpt.metadata["preprocessing"])
    model = model_from_checkpoint(ckpt)
    x = preprocess_array(_fixed_input(), int(ckpt.metadata["preprocessing"]["image_size"]))
    with torch.no_grad():
        probs = torch.sigmoid(model(x[None]).float())[0].numpy()
    np.testing.assert_allclose(probs, expected["fp32_probabilities"], atol=1e-5)

    pred = Predictor.from_checkpoint(HERE / "best.pt", device="cpu", backend="torch")
    np.testing.assert_allclose(pred.predict([_fixed_input()])[0], expected["fp32_probabilities"], atol=0.01)
    assert pred.label_names == ckpt.label_names
