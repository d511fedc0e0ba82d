"""Fine-tuning records what the model learned from (issue 12 item 4): synthetic or real, absolute data
root, manifest hash, images per split, images missing from the download; the app's model card shows it."""

from __future__ import annotations

import os

import pytest

from medxray.checkpoint import load_checkpoint
from medxray.review.model_card import is_synthetic, model_card, synthetic_banner
from medxray.training.config import TrainConfig
from medxray.training.loop import finetune
from medxray.training.state import data_provenance


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from medxray.data.synthetic import synthesize

    return synthesize(tmp_path_factory.mktemp("phantom") / "root", n_images=60, seed=3, image_size=64)


def test_checkpoint_metadata_of_phantom_splits_is_synthetic_with_counts(phantom_root, monkeypatch):
    from medxray.data import build_datasets
    from medxray.training.state import checkpoint_metadata

    monkeypatch.chdir(phantom_root.parent)
    splits = build_datasets("chestxray14", phantom_root.name, image_size=32, augment=False, use_cache=False)
    cfg = TrainConfig(dataset="chestxray14", data_root=phantom_root.name, model="densenet_40_k12", pretrained="none")
    meta = checkpoint_metadata(
        cfg,
        label_names=splits.label_names,
        manifest_hash=splits.manifest_hash,
        run_name="r",
        epoch=1,
        metrics={},
        data_summary=splits.summary,
    )
    prov = meta["data_provenance"]
    assert prov["synthetic"] is True and prov["data_root"] == str(phantom_root.resolve())
    assert prov["manifest_hash"] == splits.manifest_hash == meta["data_manifest_hash"]
    assert sum(prov["counts"].values()) == 60 and set(prov["counts"]) == {"train", "val", "test"}
    assert is_synthetic(meta) is True and "synthetic phantom images" in synthetic_banner(meta)


@pytest.mark.slow
def test_finetune_on_phantoms_records_synthetic_provenance_and_the_card_shows_it(phantom_root, tmp_path, monkeypatch):
    # the data root given relative to the working directory is stored absolute
    monkeypatch.chdir(phantom_root.parent)
    cfg = TrainConfig(
        dataset="chestxray14",
        data_root=phantom_root.name,
        model="densenet_40_k12",
        pretrained="none",
        image_size=32,
        batch_size=16,
        epochs=1,
        precision="fp32",
        progress=False,
        num_workers=0,
        out=str(tmp_path / "run"),
    )
    res = finetune(cfg)
    meta = load_checkpoint(res.best_checkpoint).metadata
    prov = meta["data_provenance"]
    assert prov["synthetic"] is True and prov["dataset"] == "chestxray14"
    assert prov["data_root"] == os.path.realpath(phantom_root) or prov["data_root"] == str(phantom_root.resolve())
    assert os.path.isabs(prov["data_root"])
    assert prov["manifest_hash"] == meta["data_manifest_hash"] and len(prov["manifest_hash"]) >= 16
    assert set(prov["counts"]) == {"train", "val", "test"} and sum(prov["counts"].values()) == 60
    assert prov["missing_by_split"] == {"train": 0, "val": 0, "test": 0}
    # the app: banner text and the model card's training-data table
    assert is_synthetic(meta) is True and "synthetic phantom images" in synthetic_banner(meta)
    card = model_card(meta)
    rows = dict(zip(card.provenance["field"], card.provenance["value"]))
    assert rows["training images"].startswith("SYNTHETIC") and rows["data root"] == prov["data_root"]
    assert rows["images missing from the download"] == "none"
    assert rows["images per split"].startswith("train ")


def test_provenance_of_real_data_counts_missing_images(tmp_path):
    summary = {
        "dataset": "chestxray14",
        "data_root": "rel/root",
        "synthetic": False,
        "counts": {"train": 900, "val": 100, "test": 500},
        "missing_dropped_by_split": {"train": 7, "val": 0, "test": 2},
        "labelled_not_in_lists": 0,
    }
    prov = data_provenance(summary, "abc123")
    assert prov["synthetic"] is False and os.path.isabs(prov["data_root"]) and prov["data_root"].endswith("rel/root")
    assert prov["missing_by_split"] == {"train": 7, "val": 0, "test": 2}
    meta = {"label_names": ["Effusion"], "data_provenance": prov}
    assert is_synthetic(meta) is False and synthetic_banner(meta) is None
    rows = dict(zip(model_card(meta).provenance["field"], model_card(meta).provenance["value"]))
    assert rows["training images"] == "real images"
    assert rows["images missing from the download"].startswith("9 (train 7, val 0, test 2)")
    # a checkpoint from before provenance was recorded: unknown, said so, no banner
    old = {"label_names": ["Effusion"], "dataset": "chestxray14"}
    assert is_synthetic(old) is None and synthetic_banner(old) is None and not len(model_card(old).provenance)
    assert any("does not record whether" in x for x in model_card(old).limitations)
