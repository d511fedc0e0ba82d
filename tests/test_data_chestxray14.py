"""ChestX-ray14 datasets on phantom data roots: layouts, items, missing and bad files, pickling."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medxray.data import build_datasets
from medxray.data.synthetic import synthesize
from medxray.errors import ConfigError, DataError
from medxray.labels import CHESTXRAY14_FINDINGS


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cx") / "flat", n_images=40, seed=0, image_size=128, workers=1)


def _copy(root, dst):
    shutil.copytree(root, dst)
    return dst


def test_contract_items_and_summary(root):
    s = build_datasets("chestxray14", root, image_size=64, use_cache=False)
    assert s.label_names == list(CHESTXRAY14_FINDINGS)
    n = {k: len(getattr(s, k)) for k in ("train", "val", "test")}
    assert n == s.summary["counts"] and sum(n.values()) == 40 and n["val"] >= 1 and n["test"] >= 1
    assert s.summary["synthetic"] is True and s.summary["missing_dropped"] == 0
    assert len(s.manifest_hash) == 64
    item = s.train[0]
    assert set(item) == {"image", "label", "mask", "name", "orig_size"}
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert type(item["image"]) is torch.Tensor
    assert item["label"].shape == item["mask"].shape == (14,) and torch.all(item["mask"] == 1)
    assert set(item["label"].tolist()) <= {0.0, 1.0}
    assert item["orig_size"] == (128, 128) and item["name"].endswith(".png")
    patients = {k: set(getattr(s, k).records.patients) for k in ("train", "val", "test")}
    assert not (patients["train"] & patients["val"]) and not (patients["test"] & (patients["train"] | patients["val"]))
    # boxes: every positive finding of every image has its box, in original pixels
    named = {b["finding"] for bl in s.boxes.values() for b in bl}
    assert named and named <= set(CHESTXRAY14_FINDINGS)
    ds = s.test
    for i in range(len(ds)):
        pos = {f for f, v in zip(CHESTXRAY14_FINDINGS, ds.labels[i]) if v}
        assert {b["finding"] for b in s.boxes.get(ds.names[i], [])} == pos


def test_same_split_and_hash_when_rebuilt_and_differs_with_seed(root):
    a = build_datasets("chestxray14", root, image_size=32, use_cache=False)
    b = build_datasets("chestxray14", root, image_size=32, use_cache=False)
    c = build_datasets("chestxray14", root, image_size=32, use_cache=False, split_seed=5, val_fraction=0.3)
    assert a.manifest_hash == b.manifest_hash and a.val.names == b.val.names
    assert c.manifest_hash != a.manifest_hash


def test_nested_layout_gives_the_same_dataset(root, tmp_path):
    nested = _copy(root, tmp_path / "nested")
    pngs = sorted((nested / "images").glob("*.png"))
    for k, p in enumerate(pngs):
        dst = nested / f"images_{k % 3 + 1:03d}" / "images"
        dst.mkdir(parents=True, exist_ok=True)
        p.rename(dst / p.name)
    (nested / "images").rmdir()
    flat = build_datasets("chestxray14", root, image_size=32, use_cache=False)
    nest = build_datasets("chestxray14", nested, image_size=32, use_cache=False)
    assert nest.manifest_hash == flat.manifest_hash
    assert "images_00" in nest.train.records.paths[0]
    assert torch.equal(
        build_datasets("chestxray14", nested, image_size=32, augment=False, use_cache=False).train[0]["image"],
        build_datasets("chestxray14", root, image_size=32, augment=False, use_cache=False).train[0]["image"],
    )


def test_missing_files_error_or_allow_missing(root, tmp_path):
    r = _copy(root, tmp_path / "missing")
    gone = sorted((r / "images").glob("*.png"))[:3]
    for p in gone:
        p.unlink()
    with pytest.raises(DataError) as exc:
        build_datasets("chestxray14", r, image_size=32, use_cache=False)
    msg = str(exc.value)
    assert "missing" in msg and "--allow-missing" in msg and gone[0].name in msg
    s = build_datasets("chestxray14", r, image_size=32, use_cache=False, allow_missing=True)
    assert s.summary["missing_dropped"] == 3 and sum(s.summary["counts"].values()) == 37
    assert not {p.name for p in gone} & {n for d in (s.train, s.val, s.test) for n in d.names}


def test_wrong_root_and_bad_options(tmp_path, root):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets("chestxray14", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        build_datasets("chestxray14", tmp_path / "empty")
    with pytest.raises(ConfigError, match="unknown dataset"):
        build_datasets("mnist", root)
    with pytest.raises(ConfigError, match="do not apply"):
        build_datasets("chestxray14", root, uncertain="ones")
    with pytest.raises(ConfigError, match="view"):
        build_datasets("chestxray14", root, view="LL")


def test_unreadable_and_16bit_images(root, tmp_path, caplog):
    from PIL import Image

    r = _copy(root, tmp_path / "bad")
    s0 = build_datasets("chestxray14", r, image_size=32, use_cache=False, augment=False)
    name0, name1 = s0.train.names[0], s0.train.names[1]
    (r / "images" / name0).write_bytes(b"this is not a png")
    arr8 = np.asarray(Image.open(r / "images" / name1))
    Image.fromarray(arr8.astype(np.uint16) * 257).save(r / "images" / name1)  # same picture, 16-bit
    s = build_datasets("chestxray14", r, image_size=32, use_cache=False, augment=False)
    with caplog.at_level("WARNING"):
        bad = s.train[0]
    assert torch.all(bad["mask"] == 0) and torch.all(bad["image"] == 0) and s.train.bad_count() == 1
    assert name0 in caplog.text and "masked" in caplog.text
    assert torch.allclose(s.train[1]["image"], s0.train[1]["image"], atol=1e-4)
    strict = build_datasets("chestxray14", r, image_size=32, use_cache=False, on_bad_image="raise")
    with pytest.raises(DataError, match="not an image"):
        strict.train[0]


def test_view_filter_on_a_root(root):
    s = build_datasets("chestxray14", root, image_size=32, use_cache=False, view="AP", allow_missing=False)
    views = [v for d in (s.train, s.val, s.test) for v in d.records.views]
    assert views and set(views) == {"AP"}


def test_pickle_and_dataloader_workers_give_distinct_augmentation(root):
    s = build_datasets("chestxray14", root, image_size=32, use_cache=False)
    ds = pickle.loads(pickle.dumps(s.train))
    assert ds.names == s.train.names and ds._tf is None
    _ = s.train[0]
    assert pickle.loads(pickle.dumps(s.train))._tf is None  # built pipeline is not pickled
    states = (torch.get_rng_state().clone(), np.random.get_state()[1].copy())
    det = build_datasets("chestxray14", root, image_size=32, use_cache=False, augment=False).train
    one = torch.stack([det[0]["image"]] * 4)
    aug = DataLoader(
        torch.utils.data.Subset(s.train, [0, 0, 0, 0]),
        batch_size=1,
        num_workers=2,
        generator=torch.Generator().manual_seed(0),
    )
    imgs = torch.cat([b["image"] for b in aug])
    assert imgs.shape == one.shape
    assert not all(torch.equal(imgs[0], imgs[k]) for k in range(1, 4))  # random, and not identical per worker
    assert np.array_equal(np.random.get_state()[1], states[1])
    val = DataLoader(s.val, batch_size=4, num_workers=0)
    batch = next(iter(val))
    assert batch["image"].shape[1:] == (3, 32, 32) and len(batch["name"]) == batch["image"].shape[0]
