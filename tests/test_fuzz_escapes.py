"""`make fuzz` stays runnable, and every image-decoder input it found escaping is replayed here.

The DICOM escapes are replayed by tests/test_dicom_faults.py; the harness itself needs atheris
(the ``fuzz`` extra) and runs only under `make fuzz`, never in `make test`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from medxray.data.imageio import decode_image
from medxray.errors import DataError

HERE = Path(__file__).resolve().parent
ESCAPES = HERE / "data" / "fuzz-escapes" / "image"


def _run_module():
    spec = importlib.util.spec_from_file_location("medxray_fuzz_run", HERE / "fuzz" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_every_image_fuzz_escape_is_refused_or_read():
    for path in sorted(ESCAPES.glob("*")):
        try:
            decode_image(path.read_bytes(), name=path.name)
        except DataError:
            pass


def test_seed_corpora_build(tmp_path):
    run = _run_module()
    assert run.dicom_seeds(tmp_path / "d") >= 150
    names = {p.name for p in (tmp_path / "d").iterdir()}
    assert {"rg1_plain", "rg1_padding", "rg1_voilut", "rg1_mlut", "rg1_RLE_Lossless"} <= names
    assert run.image_seeds(tmp_path / "i") == 27
    for p in (tmp_path / "i").iterdir():
        decode_image(p.read_bytes(), name=p.name)  # every seed is a valid image: fuzzing starts from real ones
