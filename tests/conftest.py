"""Shared pytest fixtures (add yours in a clearly marked block; keep them session-scoped when costly)."""

from __future__ import annotations

from pathlib import Path

import pytest

# ---- DICOM scoring / inference fixtures (issue 5) ------------------------------------------

SCORING_IMAGE_SIZE = 64


def make_test_checkpoint(
    path: Path,
    architecture: str = "densenet121",
    image_size: int = SCORING_IMAGE_SIZE,
    seed: int = 0,
    model_version: str = "test",
) -> Path:
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
        "architecture": architecture,
        "num_classes": len(CHESTXRAY14_FINDINGS),
        "in_chans": 3,
        "label_names": list(CHESTXRAY14_FINDINGS),
        "preprocessing": preprocessing_config(image_size),
        "thresholds": thresholds,
        "model_version": model_version,
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


# ---- OOD / body-part gate fixtures (issue 16 item 8) --------------------------------------

NIH_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "chestxray14-sample" / "images"
NIH_SAMPLE_COUNT = 240


def nih_sample_pngs() -> list[Path]:
    """The 240 real NIH sample PNGs beside the repository (../shared), sorted by name. Skips the
    calling test when the sample is not there (a clone on its own); fails when it is there but
    incomplete (a damaged copy must not pass as a smaller test)."""
    if not NIH_SAMPLE.is_dir():
        pytest.skip(f"the NIH sample is not beside this clone ({NIH_SAMPLE}); CI has ../shared")
    pngs = sorted(NIH_SAMPLE.glob("*.png"))
    assert len(pngs) == NIH_SAMPLE_COUNT, (
        f"the NIH sample must hold {NIH_SAMPLE_COUNT} PNGs beside the repository, found {len(pngs)} in {NIH_SAMPLE}"
    )
    return pngs


def nih_manifest(folder: Path, n_val: int = 80, limit: int | None = None) -> Path:
    """A CSV manifest (medxray.data.csv_manifest) of the 240 real NIH sample PNGs (the first ``limit``):
    patient from the official file name, the last patients' images (up to ``n_val``) as validation."""
    import csv

    pngs = nih_sample_pngs()[:limit]
    patients = sorted({p.name.split("_")[0] for p in pngs})
    val_patients: set[str] = set()
    for pid in reversed(patients):
        if sum(p.name.startswith(pid) for p in pngs) + sum(p.name.split("_")[0] in val_patients for p in pngs) > n_val:
            break
        val_patients.add(pid)
    path = folder / "nih_manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "patient_id", "split", "Finding"])
        for p in pngs:
            pid = p.name.split("_")[0]
            w.writerow([str(p), pid, "val" if pid in val_patients else "train", ""])
    return path


@pytest.fixture(scope="session")
def ood_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`make_test_checkpoint` with OOD statistics fitted by ``medxray ood-calibrate`` on the real
    NIH sample PNGs (train split) and a threshold on its validation split."""
    from medxray.checkpoint import load_checkpoint, save_checkpoint
    from medxray.ood import calibrate_checkpoint

    folder = tmp_path_factory.mktemp("ood")
    path = make_test_checkpoint(folder / "ood.pt")
    ck = load_checkpoint(path)
    ck.metadata.update(
        dataset="csv", config={"dataset": "csv", "data_root": str(nih_manifest(folder)), "use_cache": False}
    )
    save_checkpoint(path, ck.state_dict, ck.metadata)
    calibrate_checkpoint(path, device="cpu", num_workers=0, batch_size=32)
    return path
