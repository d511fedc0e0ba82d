"""The scorer's start-up stays light: loading a Predictor does not import MONAI or torchvision
(MONAI's package import pulled torchvision and torch._dynamo in and cost ~4.5 s of every
score-dicom start; the scorer needs only the input contract, medxray.modelinput)."""

from __future__ import annotations

import json
import subprocess
import sys


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
