"""The out-of-distribution check (issue 16 item 8): statistics, checkpoint entry, the Predictor's
single pass, finetune and ``medxray ood-calibrate`` writing them, and what gets flagged.

The session checkpoint (``ood_checkpoint`` in conftest) is a random-weight DenseNet-121 at 64 px
whose statistics were fitted on 160 of the 240 real NIH sample PNGs and thresholded on the other
80. Random-weight features still place a leg radiograph (RG3) and pixel noise far from chest
films; the figures for a trained (phantom) model are in the README.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import NIH_SAMPLE, make_test_checkpoint, nih_manifest
from pydicom.data import get_testdata_file, get_testdata_files

from medxray.checkpoint import load_checkpoint, save_checkpoint
from medxray.data.imageio import decode_image
from medxray.dicom import read_dicom
from medxray.ood import OOD_KEY, OODStats, pooled, stats_from_checkpoint
from medxray.torchfile import safe_torch_load


def _predictor(path):
    from medxray.inference import Predictor

    return Predictor.from_checkpoint(path, device="cpu", backend="torch", precision="fp32")


def _noise(seed: int = 0) -> list[np.ndarray]:
    """Pixel noise at a scale that survives resizing to the model's input (64 px uniform, 256 px binary)."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, (64, 64)).astype(np.float32) for _ in range(4)] + [
        (rng.uniform(0, 1, (256, 256)) > 0.5).astype(np.float32) for _ in range(4)
    ]


def test_distance_is_ledoit_wolf_mahalanobis_when_all_components_are_kept():
    # With k = F nothing is left for the residual, and a rotation does not change Ledoit-Wolf's
    # estimate: the distance must equal sklearn's Mahalanobis distance in the original space.
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(1)
    train = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) + 3.0
    test = rng.normal(size=(20, 8)) * 2 + 3.0
    stats = OODStats.fit(train, n_components=8)
    mean = train.mean(0)
    ref = LedoitWolf(assume_centered=True).fit(train - mean).mahalanobis(test - mean)
    np.testing.assert_allclose(stats.distance(test) ** 2, ref, rtol=1e-4)


def test_threshold_is_the_validation_percentile():
    rng = np.random.default_rng(2)
    stats = OODStats.fit(rng.normal(size=(300, 32)), n_components=8)
    val = rng.normal(size=(101, 32))
    th = stats.calibrate(val, 99.0)
    assert th == pytest.approx(np.percentile(stats.distance(val), 99.0))
    assert stats.flags(stats.distance(val)).sum() == 1  # 1 % of 101
    assert stats.flags(np.array([np.nan, 0.0])).tolist() == [True, False]


def test_checkpoint_entry_loads_weights_only(ood_checkpoint):
    obj = safe_torch_load(ood_checkpoint)  # weights_only=True
    entry = obj[OOD_KEY]
    assert isinstance(entry["mean"], torch.Tensor) and entry["components"].shape == (64, 1024)
    stats = stats_from_checkpoint(load_checkpoint(ood_checkpoint))
    assert stats is not None and stats.info["n_train"] == 160 and stats.info["n_val"] == 80
    assert stats.info["percentile"] == 99.0
    assert stats.info["val_distance_median"] < stats.threshold <= stats.info["val_distance_max"]
    assert load_checkpoint(ood_checkpoint).metadata["ood"]["threshold"] == pytest.approx(stats.threshold)


def test_predictor_scores_ood_in_the_same_forward_pass(ood_checkpoint):
    p = _predictor(ood_checkpoint)
    nih = sorted(NIH_SAMPLE.glob("*.png"))[:6]
    x = p.preprocess([decode_image(str(f)).as_float01() for f in nih] + _noise()[:2])
    calls = []
    original = p.model.forward_features

    def counted(t):
        calls.append(t.shape[0])
        return original(t)

    p.model.forward_features = counted
    try:
        probs, d = p.predict_tensor(x, with_ood=True)
    finally:
        del p.model.forward_features
    assert calls == [8]  # one pass gave both
    np.testing.assert_allclose(probs, p.predict_tensor(x), atol=1e-6)
    with torch.no_grad():
        ref = p.ood.distance(pooled(p.model.forward_features(x)))
    np.testing.assert_allclose(d, ref, rtol=1e-4)
    probs2, maps, d2 = p.predict_tensor_with_cams(x, with_ood=True)
    np.testing.assert_allclose(d2, ref, rtol=1e-4)
    assert maps.shape[0] == 8


def test_leg_and_noise_are_flagged_chest_films_mostly_not(ood_checkpoint, tmp_path):
    p = _predictor(ood_checkpoint)

    def flags(images):
        return p.ood.flags(p.predict_tensor(p.preprocess(images), with_ood=True)[1])

    legs = [read_dicom(f, allowed_modalities=None).pixels for f in sorted(get_testdata_files("RG3*"))]
    assert len(legs) == 4 and flags(legs).all()
    assert flags(_noise(3)).all()
    assert not flags([read_dicom(get_testdata_file("RG1_UNCI.dcm")).pixels]).any()
    # validation images: the threshold is their 99th percentile, so about one is over it
    import csv

    with open(nih_manifest(tmp_path)) as fh:  # the same split the fixture calibrated on
        val = [r["image"] for r in csv.DictReader(fh) if r["split"] == "val"]
    assert len(val) == 80 and flags([decode_image(f).as_float01() for f in val]).sum() <= 2


def test_no_statistics_means_no_check(scoring_checkpoint):
    p = _predictor(scoring_checkpoint)
    assert p.ood is None
    probs, d = p.predict_tensor(p.preprocess(_noise()[:1]), with_ood=True)
    assert d is None and probs.shape == (1, 14)


def test_damaged_entry_is_a_clear_checkpoint_error(tmp_path):
    from medxray.errors import CheckpointError

    path = make_test_checkpoint(tmp_path / "c.pt")
    ck = load_checkpoint(path)
    save_checkpoint(path, ck.state_dict, ck.metadata, ood={"format": "medxray-ood/1", "mean": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="ood-calibrate"):
        _predictor(path)


def test_finetune_stores_ood_statistics(tmp_path):
    from medxray.training.config import make_config
    from medxray.training.loop import finetune

    manifest = nih_manifest(tmp_path, n_val=12, limit=40)
    n_val = manifest.read_text().count(",val,")
    cfg = make_config(
        dataset="csv",
        data_root=str(tmp_path),
        dataset_options={"csv_path": str(manifest)},
        model="densenet_40_k12",
        pretrained="none",
        image_size=32,
        epochs=1,
        batch_size=8,
        max_steps_per_epoch=2,
        device="cpu",
        num_workers=0,
        use_cache=False,
        early_stopping_patience=0,
        out=str(tmp_path / "run"),
        progress=False,
    )
    res = finetune(cfg)
    ck = load_checkpoint(res.best_checkpoint)
    stats = stats_from_checkpoint(ck)
    assert stats is not None and stats.threshold > 0
    assert stats.info["n_train"] == 40 - n_val and stats.info["n_val"] == n_val and n_val >= 8
    assert stats.components.shape[1] == stats.mean.shape[0] == stats.info["feature_dim"]
    assert ck.metadata["ood"]["threshold"] == pytest.approx(stats.threshold)


def test_ood_calibrate_command(tmp_path, capsys):
    from medxray.cli import main

    path = make_test_checkpoint(tmp_path / "old.pt", image_size=32)
    assert stats_from_checkpoint(load_checkpoint(path)) is None
    assert main(["ood-calibrate", "--checkpoint", str(path)]) == 2  # no data root recorded: a clear refusal
    assert "--data-root" in capsys.readouterr().err
    ck = load_checkpoint(path)
    ck.metadata.update(dataset="csv", config={"use_cache": False})
    save_checkpoint(path, ck.state_dict, ck.metadata)
    manifest = nih_manifest(tmp_path, n_val=12, limit=40)
    assert (
        main(
            [
                "ood-calibrate",
                "--checkpoint",
                str(path),
                "--data-root",
                str(manifest),
                "--device",
                "cpu",
                "--components",
                "16",
            ]
        )
        == 0
    )
    stats = stats_from_checkpoint(load_checkpoint(path))
    assert stats is not None and stats.components.shape == (16, 1024)
    assert stats.info["n_val"] == manifest.read_text().count(",val,")
    assert "threshold" in capsys.readouterr().out
