"""Issue 16 item 4 / issue 10: every file of pydicom's and pydicom-data's test corpus goes through
the reader, and only the project's own error type ever leaves it (about 260 files, ~10 s).

The corpus holds every transfer syntax pydicom tests, damaged files, odd VRs, colour and
multi-frame objects; any modality is allowed so that every file reaches the decoder.
"""

from __future__ import annotations

import collections
import os
import warnings

import numpy as np
import pytest

from medxray.dicom import read_dicom
from medxray.errors import DicomError

pydicom_data = pytest.importorskip("pydicom.data")


def test_every_corpus_file_is_read_or_refused_with_dicom_error():
    files = pydicom_data.get_testdata_files()
    assert len(files) >= 250 and any("RG1_UNCR" in f for f in files), "pydicom-data must be installed"
    outcomes: collections.Counter[str] = collections.Counter()
    escapes = []
    for path in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = read_dicom(path, allowed_modalities=None)
        except DicomError as exc:
            assert exc.code and str(exc).startswith(exc.code + ": ") and "\n" not in str(exc), path
            outcomes[exc.code] += 1
        except BaseException as exc:  # noqa: BLE001 - the point is that nothing else escapes
            escapes.append(f"{os.path.basename(path)}: {type(exc).__name__}: {str(exc)[:120]}")
        else:
            assert img.pixels.dtype == np.float32 and img.pixels.ndim == 2, path
            assert 0.0 <= float(img.pixels.min()) and float(img.pixels.max()) <= 1.0, path
            outcomes["ok"] += 1
    assert not escapes, "\n".join(escapes)
    assert outcomes["ok"] >= 50 and len(outcomes) >= 8, outcomes
