"""Shared pytest fixtures (add yours in a clearly marked block; keep them session-scoped when costly)."""

from __future__ import annotations

from pathlib import Path

import pytest

# ---- DICOM scoring / inference fixtures (issue 5) ------------------------------------------

SCORING_IMAGE_SIZE = 64


def make_test_checkpoint(path: Path, architecture: str = "densenet121", image_size: int = SCORING_IMAGE_SIZE,
                         seed: int = 0, model_version: str = "test") -> Path:
    """A small random model saved as a real medxray checkpoint.

    The head is scaled so logits spread like a trained model's (std ~3, probabilities from
    ~0.02 to ~0.98); left at 0.5 a precision test would be too easy.
    """
    import torch

    from medxray.checkpoint import save_checkpoint
    from medxray.data.transforms import preprocessing_config
    from medxray.labels import CHESTXRAY14_FINDINGS
    from medxray.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_model(architecture, num_classes=len(CHESTXRAY14_FINDINGS))
        with torch.no_grad():
            model.classifier.weight.mul_(8.0)
            model.classifier.bias.uniform_(-2.0, 2.0)
    thresholds = {n: 0.5 for n in CHESTXRAY14_FINDINGS}
    meta = {
        "architecture": architecture, "num_classes": len(CHESTXRAY14_FINDINGS), "in_chans": 3,
        "label_names": list(CHESTXRAY14_FINDINGS), "preprocessing": preprocessing_config(image_size),
        "thresholds": thresholds, "model_version": model_version,
    }
    return save_checkpoint(path, model.state_dict(), meta)


@pytest.fixture(scope="session", autouse=True)
def _medxray_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Converted OpenVINO models are cached per test session, never in the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDXRAY_CACHE_DIR", str(tmp_path_factory.mktemp("medxray-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def scoring_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """densenet121 (random weights, spread head) at 64 px, 14 ChestX-ray14 findings."""
    return make_test_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="session")
def dicom_corpus(tmp_path_factory: pytest.TempPathFactory):
    """(root, {relative path: Expect}) of the generated odd/broken DICOM corpus; do not modify it."""
    from dicom_corpus import build_corpus

    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root)
