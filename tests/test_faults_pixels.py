"""Issue 10 item 9: one pixel limit, configurable, wherever images are decoded.

The PNG/JPEG decoder (training reader, cache, app uploads) and the DICOM reader (scorer, app,
node) share one default (:data:`medxray.limits.DEFAULT_MAX_PIXELS`) and one setting
(``$MEDXRAY_MAX_PIXELS``, read at each call so worker processes follow it); an explicit
``max_pixels`` argument wins. Sizes are checked from the header, before any pixel is decoded.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NIH_SAMPLE, nih_sample_pngs

from medxray.data.imageio import decode_image, read_image
from medxray.dicom import DEFAULT_MAX_PIXELS as DICOM_DEFAULT
from medxray.dicom import read_dicom
from medxray.errors import ConfigError, DataError, DicomError
from medxray.limits import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, pixel_limit
from medxray.review.study import load_study_bytes

NIH_PNG = NIH_SAMPLE / "00000075_000.png"  # 1024 x 1024 = 1,048,576 pixels


def png_header_only(path: Path, width: int, height: int, color_type: int = 6) -> Path:
    """A PNG whose header claims width x height (RGBA by default) with one tiny IDAT: what a
    decompression bomb looks like to a header check, at a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + width * 4) * 2)  # two rows; a decoder would stop at the third
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_one_default_for_every_decoder(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    assert DICOM_DEFAULT == DEFAULT_MAX_PIXELS == pixel_limit() == 60_000_000
    from medxray.scoring import ScoreConfig
    from medxray.scoring.config import validate_config

    cfg = ScoreConfig("in", "ckpt", "out")
    validate_config(cfg)
    assert pixel_limit(cfg.max_pixels) == DEFAULT_MAX_PIXELS


def test_resolution_order(monkeypatch):
    monkeypatch.setenv(MAX_PIXELS_ENV, "2_000_000")
    assert pixel_limit() == 2_000_000
    assert pixel_limit(5) == 5  # an explicit argument wins
    for bad in ("lots", "0", "-3", "1.5e6"):
        monkeypatch.setenv(MAX_PIXELS_ENV, bad)
        with pytest.raises(ConfigError, match=MAX_PIXELS_ENV):
            pixel_limit()
    with pytest.raises(ConfigError, match="max_pixels"):
        pixel_limit(0)


def test_the_environment_limits_every_decoder(monkeypatch, tmp_path):
    """1,000,000 pixels: the real 1024x1024 NIH PNG is refused by the training reader, the app,
    and in a DataLoader worker process; the real 1955x1841 RG1 CR by the DICOM reader."""
    from pydicom.data import get_testdata_file

    assert NIH_PNG in nih_sample_pngs()  # skips without ../shared (CI has it)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000000")
    with pytest.raises(DataError, match="1024x1024 pixels, more than the 1 megapixels"):
        read_image(NIH_PNG)
    with pytest.raises(DataError, match="megapixels"):
        load_study_bytes(NIH_PNG.read_bytes(), NIH_PNG.name)
    with pytest.raises(DicomError, match="too_large"):
        read_dicom(get_testdata_file("RG1_UNCI.dcm"))
    with pytest.raises(DicomError, match="too_large"):
        load_study_bytes(Path(get_testdata_file("RG1_UNCI.dcm")).read_bytes(), "rg1.dcm")

    from medxray.data.loading import make_loader

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": torch.from_numpy(read_image(NIH_PNG)[0].astype(np.float32)), "label": torch.zeros(1)}

    with pytest.raises(DataError, match="megapixels"):  # the worker process reads the same setting
        next(iter(make_loader(Files(), batch_size=1, seed=0, num_workers=1)))
    monkeypatch.setenv(MAX_PIXELS_ENV, str(1024 * 1024))
    assert read_image(NIH_PNG)[1] == (1024, 1024)  # exactly at the limit is accepted


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns from Image.open, above 89 MP
def test_a_13300_square_rgba_png_is_refused_from_its_header(tmp_path, monkeypatch):
    """The issue's bomb (13300x13300 RGBA: 177 MP, 707 MB decoded) costs neither time nor memory."""
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    bomb = png_header_only(tmp_path / "bomb.png", 13300, 13300)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="13300x13300 pixels, more than the 60 megapixels"):
        read_image(bomb)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 1.0 and peak < 16 << 20, (seconds, peak)
    # above Pillow's own ceiling the refusal still speaks of megapixels, not of a damaged file
    with pytest.raises(DataError, match="megapixels"):
        decode_image(png_header_only(tmp_path / "huge.png", 20000, 20000), max_pixels=500_000_000)


def test_score_dicom_refuses_a_bad_setting_in_one_line(monkeypatch, capsys, tmp_path):
    from medxray.cli import main

    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    rc = main(["score-dicom", str(tmp_path), "--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and MAX_PIXELS_ENV in err and len(err.strip().splitlines()) == 1, err
