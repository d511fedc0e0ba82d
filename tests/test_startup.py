"""The scorer's start-up stays light: loading a Predictor does not import MONAI or torchvision
(MONAI's package import pulled torchvision and torch._dynamo in and cost ~4.5 s of every
score-dicom start; the scorer needs only the input contract, medxray.modelinput)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_loading_a_predictor_imports_neither_monai_nor_torchvision(scoring_checkpoint, tmp_path):
    code = (
        "import json, sys\n"
        "from medxray.inference import Predictor\n"
        "from medxray.scoring import ScoreConfig, score_directory\n"
        f"p = Predictor.from_checkpoint({str(scoring_checkpoint)!r}, device='cpu', backend='torch')\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'monai', 'torchvision', 'streamlit'})))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_decode_workers_draw_overlays_without_importing_torch(tmp_path):
    """A decode worker reads a real CR, draws two overlays and writes their PNGs without torch
    (importing torch cost each worker ~1.5 core-seconds; medxray.overlay is numpy/PIL/imagecodecs)."""
    pytest.importorskip("pydicom.data")
    code = (
        "import json, sys\n"
        "import numpy as np\n"
        "from pydicom.data import get_testdata_file\n"
        "from medxray.scoring.messages import PostTask\n"
        "from medxray.scoring.workers import decode_job, post_job\n"
        "d = decode_job(get_testdata_file('RG1_UNCR.dcm'), 224, None, None, 1024)\n"
        "cams = np.zeros((2, 224, 224), np.float32); cams[:, 40:120, 60:150] = 1.0\n"
        f"t = PostTask(out={str(tmp_path)!r}, stem='s', classes=('Edema', 'Mass'), class_probs=(0.7, 0.6),\n"
        "             cams=cams, display=d.display, cam_method='layercam-denseblock1',\n"
        "             overlay_max_side=1024, sr=None)\n"
        "r = post_job(t)\n"
        "print(json.dumps([r.cam_dir, r.note, 'torch' in sys.modules]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cam_dir, note, torch_loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert note == "" and cam_dir and not torch_loaded
    from PIL import Image

    for name in ("Edema", "Mass"):
        with Image.open(tmp_path / cam_dir / f"{name}.png") as im:
            assert im.mode == "RGB" and max(im.size) >= 1024  # display size plus the legend
