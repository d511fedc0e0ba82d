"""`medxray finetune` / `medxray evaluate` bad input: one clear message, exit code 2, no traceback."""

from __future__ import annotations

import pytest
import torch
import yaml

from medxray.cli import main


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from medxray.data.synthetic import synthesize

    return synthesize(tmp_path_factory.mktemp("phantom") / "root", n_images=60, seed=0, image_size=64, workers=1)


def run(argv, capsys):
    rc = main(["-q", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_clean_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("medxray "), err
    for n in needles:
        assert n in last, last


BASE = ["finetune", "--pretrained", "none", "--model", "densenet_40_k12", "--image-size", "32", "--no-progress"]


def test_missing_data_root(tmp_path, capsys):
    rc, _, err = run([*BASE, "--data-root", tmp_path / "nowhere", "--out", tmp_path / "r"], capsys)
    assert_clean_error(rc, err, "does not exist")


def test_wrong_data_root(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = run([*BASE, "--data-root", tmp_path / "empty", "--out", tmp_path / "r"], capsys)
    assert_clean_error(rc, err)


def test_no_data_root(tmp_path, capsys):
    rc, _, err = run([*BASE, "--out", tmp_path / "r"], capsys)
    assert_clean_error(rc, err, "--data-root is required")


def test_unknown_dataset(tmp_path, capsys):
    rc, _, err = run([*BASE, "--dataset", "mnist", "--data-root", tmp_path], capsys)
    assert_clean_error(rc, err, "unknown dataset 'mnist'")


def test_batch_size_larger_than_the_data(phantom_root, tmp_path, capsys):
    rc, _, err = run([*BASE, "--data-root", phantom_root, "--batch-size", 5000, "--out", tmp_path / "r"], capsys)
    assert_clean_error(rc, err, "batch size 5000 is larger than the training set")


def test_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"epochs": 1, "learning_rate": 0.1}))
    rc, _, err = run(["finetune", "--config", cfg], capsys)
    assert_clean_error(rc, err, "unknown config key 'learning_rate'", "did you mean 'lr'")


def test_pretrained_weights_of_another_architecture(phantom_root, tmp_path, capsys):
    from medxray.models import create_model

    weights = tmp_path / "densenet_bc_100_k12.pth"
    torch.save(create_model("densenet_bc_100_k12", num_classes=14).state_dict(), weights)
    argv = [*BASE, "--data-root", phantom_root, "--pretrained", weights, "--batch-size", 4, "--out", tmp_path / "r"]
    rc, _, err = run(argv, capsys)
    assert_clean_error(rc, err, "does not fit densenet_40_k12")


def test_imagenet_weights_not_cached(phantom_root, tmp_path, capsys, monkeypatch):
    """The default (--pretrained imagenet) with no cached file and no way to download it."""
    import medxray.models.weights as weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    # an address that refuses at once, so the test is offline even where the internet is reachable
    monkeypatch.setattr(weights, "WEIGHTS_BASE_URL", "http://127.0.0.1:9/")
    argv = [
        "finetune",
        "--data-root",
        phantom_root,
        "--pretrained",
        "imagenet",
        "--image-size",
        32,
        "--batch-size",
        4,
        "--out",
        tmp_path / "r",
        "--no-progress",
    ]
    rc, _, err = run(argv, capsys)
    assert_clean_error(rc, err, "ImageNet weights for densenet121", "--pretrained none")


def test_evaluate_checkpoint_of_another_architecture(phantom_root, tmp_path, capsys):
    from medxray.checkpoint import save_checkpoint
    from medxray.data.transforms import preprocessing_config
    from medxray.labels import CHESTXRAY14_FINDINGS
    from medxray.models import create_model

    bad = tmp_path / "bad.pt"
    save_checkpoint(
        bad,
        create_model("densenet_40_k12", num_classes=14).state_dict(),
        {
            "architecture": "densenet_bc_100_k12",
            "num_classes": 14,
            "in_chans": 3,
            "label_names": list(CHESTXRAY14_FINDINGS),
            "preprocessing": preprocessing_config(32),
        },
    )
    rc, _, err = run(["evaluate", "--checkpoint", bad, "--data-root", phantom_root], capsys)
    assert_clean_error(rc, err, "do not fit architecture 'densenet_bc_100_k12'")
    rc, _, err = run(["evaluate", "--checkpoint", tmp_path / "missing.pt", "--data-root", phantom_root], capsys)
    assert_clean_error(rc, err, "does not exist")


def test_resume_problems(tmp_path, capsys):
    rc, _, err = run(["finetune", "--resume", tmp_path / "no_run"], capsys)
    assert_clean_error(rc, err, "no such run directory")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text(yaml.safe_dump({"epochs": 2}))
    rc, _, err = run(["finetune", "--resume", tmp_path / "half"], capsys)
    assert_clean_error(rc, err, "no completed epoch")


def test_finetune_on_a_csv_manifest_via_flags(tmp_path, capsys):
    """A hospital's own labels: --dataset csv --csv FILE reaches the data layer and trains."""
    import numpy as np
    from PIL import Image

    from medxray.checkpoint import load_checkpoint

    rows = ["image,patient_id,split,Effusion,Pneumothorax"]
    rng = np.random.default_rng(0)
    for i in range(24):
        rel = f"scans/p{i // 2}/img{i}.png"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / rel)
        split = "test" if i >= 20 else "train"
        rows.append(f"{rel},P{i // 2},{split},{'' if i % 5 == 0 else i % 2},{(i // 2) % 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    rc, out, err = run(
        [
            *BASE,
            "--dataset",
            "csv",
            "--data-root",
            tmp_path,
            "--csv",
            "labels.csv",
            "--epochs",
            1,
            "--batch-size",
            4,
            "--val-fraction",
            0.25,
            "--out",
            tmp_path / "run",
        ],
        capsys,
    )
    assert rc == 0, err
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt.label_names == ["Effusion", "Pneumothorax"]
    cfg = yaml.safe_load(next((tmp_path / "run").glob("config*.yaml")).read_text())
    assert cfg["dataset_options"] == {"csv_path": "labels.csv"}


def test_uncertain_policy_flag_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--dataset", "chexpert", "--uncertain", "maybe", "--data-root", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'maybe'" in err and "Traceback" not in err
