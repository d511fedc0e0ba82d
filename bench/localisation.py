"""Localisation of every map method on one checkpoint and the same boxed images, side by side.

For each method of :data:`medxray.cam.MAP_METHODS` (the peer is ``cam``, measured in the same
run): pointing game, IoBB accuracy at T = 0.1 / 0.25 / 0.5 / 0.75 (Wang et al. 2017), mean IoBB
and milliseconds per map (one image, one finding), with the ratio to CAM's time and the load
average. Numbers on a phantom data root are PHANTOM numbers, not evidence about radiographs.

    python bench/localisation.py [--checkpoint C --data-root R] [--max-images N]

Without --checkpoint it uses demo_out's best checkpoint (``make demo``) or, failing that, trains
the quick demo's tiny model first (its numbers then say little).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from medxray.cam import MAP_METHODS
    from medxray.checkpoint import load_checkpoint, model_from_checkpoint
    from medxray.data import build_datasets
    from medxray.data.manifest import PHANTOM_MARKER
    from medxray.evaluation.localisation import localise_batch, summarise_localisation

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--data-root")
    ap.add_argument("--max-images", type=int, default=120)
    ap.add_argument("--methods", default=",".join(MAP_METHODS))
    a = ap.parse_args(argv)
    ckpt_path, root = a.checkpoint, a.data_root
    if ckpt_path is None:
        summary = Path("demo_out/demo_summary.json")
        if summary.is_file():
            ckpt_path = json.loads(summary.read_text())["checkpoint"]
        else:
            from medxray.demo import DemoOptions, run_demo

            res = run_demo(
                DemoOptions.preset("quick", out="bench_out/quick_demo", score_rg1=False), echo=lambda s: None
            )
            ckpt_path = str(res.checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    meta = ckpt.metadata
    root = root or (meta.get("config") or {}).get("data_root")
    size = int(meta["preprocessing"]["image_size"])
    model = model_from_checkpoint(ckpt).eval()
    splits = build_datasets("chestxray14", root, image_size=size, augment=False)
    test = splits.test
    boxed = [i for i, n in enumerate(test.names) if n in splits.boxes][: a.max_images]
    if not boxed:
        print(f"no boxed test images under {root}")
        return 1
    items = [test[i] for i in boxed]
    x = torch.stack([torch.as_tensor(it["image"]) for it in items])
    names = [it["name"] for it in items]
    orig = [it["orig_size"] for it in items]
    index_of = {n: i for i, n in enumerate(ckpt.label_names)}
    with torch.no_grad():
        probs = torch.sigmoid(model(x)).numpy()
    source = "PHANTOM" if (Path(root) / PHANTOM_MARKER).is_file() else "real"
    rows, cam_ms = [], None
    for method in a.methods.split(","):
        t0 = time.perf_counter()
        recs = []
        for j in range(0, len(items), 8):
            recs += localise_batch(
                model,
                x[j : j + 8],
                [splits.boxes[n] for n in names[j : j + 8]],
                names=names[j : j + 8],
                orig_sizes=orig[j : j + 8],
                index_of=index_of,
                probs=probs[j : j + 8],
                method=method,
            )
        ms = (time.perf_counter() - t0) * 1000 / max(len(recs), 1)
        cam_ms = ms if method == "cam" else cam_ms
        o = summarise_localisation(recs, ckpt.label_names)["overall"]
        rows.append((method, o, ms))
    print(
        f"{source} localisation, {Path(ckpt_path)}, {size} px, {len(items)} images, {rows[0][1]['n']} boxes, "
        f"torch threads {torch.get_num_threads()}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(
        f"{'method':22} {'pointing':>8} {'IoBB>0.1':>8} {'>0.25':>6} {'>0.5':>6} {'>0.75':>6} {'meanIoBB':>8} "
        f"{'ms/map':>7} {'vs cam':>7}"
    )
    for method, o, ms in rows:
        acc = o["iobb_accuracy"]
        ratio = f"{ms / cam_ms:.1f}x" if cam_ms else "-"
        print(
            f"{method:22} {o['pointing_game']:8.2f} {acc['0.1']:8.2f} {acc['0.25']:6.2f} {acc['0.5']:6.2f} "
            f"{acc['0.75']:6.2f} {o['mean_iobb']:8.2f} {ms:7.1f} {ratio:>7}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
