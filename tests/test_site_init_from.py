"""Issue 22 item 5: `finetune --init-from C` starts from a deployed checkpoint (head rows matched by finding) and
`freeze_blocks` / `freeze_bn` keep the early blocks and BatchNorm statistics exactly as they were."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import Dataset

from medxray.labels import CHESTXRAY14_FINDINGS

LABELS = ["Effusion", "Mass", "NewFinding"]


class Blobs(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.y = (rng.random((n, 3)) < 0.4).astype(np.float32)
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        img = torch.randn(3, 32, 32, generator=g) * 0.5
        for c in range(3):
            if self.y[i, c]:
                img[:, 4 + 8 * c : 10 + 8 * c, 4:28] += 2.0
        return {
            "image": img,
            "label": torch.from_numpy(self.y[i]),
            "mask": torch.ones(3),
            "name": f"b{i}.png",
            "orig_size": (32, 32),
        }


def test_init_from_loads_weights_by_finding_and_freezes(tmp_path):
    from conftest import make_test_checkpoint

    from medxray.checkpoint import load_checkpoint
    from medxray.training.config import make_config
    from medxray.training.loop import finetune

    src = make_test_checkpoint(tmp_path / "deployed.pt", image_size=32)
    splits = SimpleNamespace(
        train=Blobs(32, 1),
        val=Blobs(16, 2),
        test=None,
        label_names=LABELS,
        manifest_hash="blobs",
        summary={"counts": {"train": 32, "val": 16}},
        boxes={},
    )
    cfg = make_config(
        init_from=str(src),
        model="densenet169",
        image_size=32,
        batch_size=8,
        epochs=1,
        lr=1e-2,
        precision="fp32",
        progress=False,
        num_workers=0,
        freeze_blocks=2,
        freeze_bn=True,
        out=str(tmp_path / "run"),
        channels_last=False,
    )
    res = finetune(cfg, splits=splits)
    old, new = load_checkpoint(src), load_checkpoint(res.last_checkpoint)
    assert new.metadata["architecture"] == "densenet121"  # the checkpoint's, not the config's
    a, b = old.state_dict, new.state_dict
    for k in b:
        if (
            k.startswith(
                (
                    "features.conv0",
                    "features.norm0",
                    "features.denseblock1.",
                    "features.denseblock2.",
                    "features.transition1.",
                    "features.transition2.",
                )
            )
            or ".norm" in k
            or k.startswith("features.norm5")
        ):
            assert torch.equal(a[k], b[k]), f"{k} changed although frozen"
    assert not torch.equal(
        a["features.denseblock3.denselayer1.conv1.weight"], b["features.denseblock3.denselayer1.conv1.weight"]
    )
    assert not torch.equal(a["classifier.weight"][CHESTXRAY14_FINDINGS.index("Effusion")], b["classifier.weight"][0])
    # head rows were taken by finding name before training moved them: one step of lr 1e-2 moves little
    j = CHESTXRAY14_FINDINGS.index("Mass")
    assert torch.nn.functional.cosine_similarity(a["classifier.weight"][j], b["classifier.weight"][1], dim=0) > 0.9
