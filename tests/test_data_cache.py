"""Preprocessing cache: round trip equals decode + resize, resume, bad files, use by datasets, verify."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from medxray.cli import main
from medxray.data import build_datasets
from medxray.data.cache import PixelCache, find_cache, verify_cache
from medxray.data.core import read_image
from medxray.data.prepare import prepare_cache
from medxray.data.synthetic import synthesize
from medxray.data.transforms import scale_resize_transforms
from medxray.errors import DataError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cache") / "ph", n_images=24, seed=2, image_size=160, workers=1)


@pytest.fixture()
def fresh(root, tmp_path):
    dst = tmp_path / "root"
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns("medxray_cache"))
    return dst


def _decode_resize(path, size):
    arr, _ = read_image(path)
    out = Compose(scale_resize_transforms(size))({"image": arr})["image"]
    return np.clip(np.rint(np.asarray(out[0]) * 255), 0, 255).astype(np.uint8)


def test_round_trip_equals_decode_and_resize(fresh):
    rep = prepare_cache("chestxray14", fresh, 48, workers=2, progress=False)
    assert rep["state"] == "complete" and rep["done"] == 24 and rep["bad"] == 0 and rep["processed_now"] == 24
    cache = PixelCache(rep["path"])
    for row in (0, 7, 23):
        path = next(fresh.glob(f"images/{cache.names[row]}"))
        assert np.array_equal(cache.read(row), _decode_resize(path, 48))
        assert cache.orig_size(row) == (160, 160)
    assert verify_cache(rep["path"])["crc_mismatch"] == 0


def test_resume_after_interruption(fresh):
    part = prepare_cache("chestxray14", fresh, 40, workers=1, progress=False, max_items=10)
    assert part["state"] == "building" and part["done"] == 10 and part["todo"] == 14
    s = build_datasets("chestxray14", fresh, image_size=32, use_cache=True)
    assert s.summary["cache"] is None  # an unfinished cache is never used
    rest = prepare_cache("chestxray14", fresh, 40, workers=1, progress=False)
    assert rest["state"] == "complete" and rest["processed_now"] == 14 and rest["done"] == 24
    again = prepare_cache("chestxray14", fresh, 40, workers=1, progress=False)
    assert again["processed_now"] == 0
    cache = PixelCache(rest["path"])
    for row in range(24):
        assert np.array_equal(cache.read(row), _decode_resize(fresh / "images" / cache.names[row], 40))


def test_datasets_use_the_cache_and_match_decoding(fresh):
    prepare_cache("chestxray14", fresh, 64, workers=1, progress=False)
    cached = build_datasets("chestxray14", fresh, image_size=64, augment=False)
    plain = build_datasets("chestxray14", fresh, image_size=64, augment=False, use_cache=False)
    assert cached.summary["cache"] and plain.summary["cache"] is None
    assert cached.manifest_hash == plain.manifest_hash
    for ds_c, ds_p in ((cached.train, plain.train), (cached.test, plain.test)):
        a, b = ds_c[0], ds_p[0]
        assert a["name"] == b["name"] and a["orig_size"] == b["orig_size"] == (160, 160)
        assert torch.allclose(a["image"], b["image"], atol=0.5 / 255 / 0.224 + 1e-5)
    # a smaller training size reads the 64 px cache and resizes; images can then even be absent
    shutil.rmtree(fresh / "images")
    small = build_datasets("chestxray14", fresh, image_size=32, augment=False)
    assert small.summary["cache"] and small.train[0]["image"].shape == (3, 32, 32)
    with pytest.raises(DataError, match="no images found"):
        build_datasets("chestxray14", fresh, image_size=96)  # no cache >= 96 px and no files


def test_bad_images_are_counted_and_left_out(fresh, caplog):
    names = sorted(p.name for p in (fresh / "images").glob("*.png"))
    (fresh / "images" / names[0]).write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with caplog.at_level("WARNING"):
        rep = prepare_cache("chestxray14", fresh, 32, workers=1, progress=False)
    assert rep["state"] == "complete" and rep["bad"] == 1 and rep["done"] == 23
    assert "1 unreadable" in caplog.text and names[0] in caplog.text
    bad = json.loads((fresh / "medxray_cache" / "chestxray14_32" / "bad.json").read_text())
    assert list(bad) == [names[0]]
    cache = find_cache(fresh, "chestxray14", 32, rep["label_sha256"])
    assert cache is not None and cache.rows_for([names[0]])[0] == -1


def test_corruption_and_label_change_are_detected(fresh):
    rep = prepare_cache("chestxray14", fresh, 32, workers=1, progress=False)
    pix = fresh / "medxray_cache" / "chestxray14_32" / "pixels.u8"
    data = bytearray(pix.read_bytes())
    data[5 * 32 * 32 + 100] ^= 0xFF
    pix.write_bytes(bytes(data))
    v = verify_cache(rep["path"])
    assert v["crc_mismatch"] == 1
    assert find_cache(fresh, "chestxray14", 32, "another-label-file") is None
    pix.write_bytes(bytes(data[:-10]))
    with pytest.raises(DataError, match="wrong size"):
        PixelCache(rep["path"])


def test_cli_prepare_verify_and_errors(fresh, tmp_path, capsys):
    assert main(["-q", "data", "prepare", "--data-root", str(fresh), "--size", "32", "--workers", "1"]) == 0
    assert "complete" in capsys.readouterr().out
    assert main(["-q", "data", "verify", "--data-root", str(fresh), "--decode", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decoded"] == 5 and out["unreadable"] == 0 and out["caches"]["chestxray14_32"]["crc_mismatch"] == 0
    assert out["synthetic"] is True and out["sizes"] == {"160x160": 5} and out["problems"] == []
    # without the phantom marker the root counts as real NIH data, where 160 px images are unexpected
    (fresh / "MEDXRAY_PHANTOM.json").unlink()
    assert main(["-q", "data", "verify", "--data-root", str(fresh), "--decode", "all"]) == 1
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["decoded"] == 24 and out["unexpected_size"] == 24
    assert out["problems"] == ["24 image(s) not 1024x1024"] and "problem: 24 image(s)" in cap.err
    assert main(["data", "prepare", "--data-root", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert main(["data", "verify", "--data-root", str(fresh), "--decode", "lots"]) == 2
