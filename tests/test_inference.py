"""medxray.inference.Predictor: checkpoint -> probabilities/CAMs; fast backends agree with fp32 eager."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from conftest import SCORING_IMAGE_SIZE

from medxray import inference
from medxray.checkpoint import load_checkpoint, save_checkpoint
from medxray.data.transforms import preprocess_array
from medxray.errors import CheckpointError, ConfigError, InputShapeError
from medxray.inference import PROB_TOLERANCE, Predictor, cpu_has_native_bf16
from medxray.labels import CHESTXRAY14_FINDINGS


@pytest.fixture(scope="module")
def images(dicom_corpus):
    """Real-looking inputs: RG1 (downsampled for speed) and corpus phantoms."""
    from pydicom.data import get_testdata_file

    from medxray.dicom import read_dicom

    root, expect = dicom_corpus
    rg1 = read_dicom(get_testdata_file("RG1_UNCR.dcm")).pixels[::4, ::4].copy()
    ok = [read_dicom(root / r).pixels for r, e in sorted(expect.items()) if e.status == "ok"][:9]
    rng = np.random.default_rng(0)
    noisy = np.clip(rg1 + 0.05 * rng.standard_normal(rg1.shape).astype(np.float32), 0, 1)
    return [rg1, noisy, rg1[:, ::-1].copy(), *ok]


@pytest.fixture(scope="module")
def fp32(scoring_checkpoint):
    return Predictor.from_checkpoint(scoring_checkpoint, device="cpu", backend="torch", precision="fp32")


def _eager_reference(path, images):
    """fp32 eager, written out by hand: model(preprocess_array(x)) -> sigmoid."""
    from medxray.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(path)
    x = torch.stack([preprocess_array(a, SCORING_IMAGE_SIZE) for a in images])
    with torch.no_grad():
        return torch.sigmoid(model(x)).numpy()


def test_predictor_metadata(fp32):
    assert fp32.label_names == list(CHESTXRAY14_FINDINGS)
    assert fp32.thresholds == {n: 0.5 for n in CHESTXRAY14_FINDINGS}
    assert fp32.image_size == SCORING_IMAGE_SIZE and fp32.architecture == "densenet121"
    assert fp32.model_version == "test" and fp32.metadata["num_classes"] == 14
    assert (fp32.backend, fp32.precision, str(fp32.device)) == ("torch", "fp32", "cpu")


def test_preprocess_is_the_shared_deterministic_list(fp32, images):
    for a in images[:3]:
        assert torch.equal(fp32.preprocess([a])[0], preprocess_array(a, SCORING_IMAGE_SIZE))


def test_fp32_equals_eager_reference(fp32, scoring_checkpoint, images):
    ref = _eager_reference(scoring_checkpoint, images)
    got = fp32.predict(images)
    assert got.shape == (len(images), 14) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert ref.min() < 0.2 and ref.max() > 0.8, "test model must spread its probabilities"


@pytest.fixture(scope="module")
def fast(scoring_checkpoint):
    """The default CPU predictor (auto backend): OpenVINO, bf16 where the CPU has it."""
    return Predictor.from_checkpoint(scoring_checkpoint, device="cpu", batch_size=4)


def test_auto_backend_on_cpu_is_openvino(fast):
    assert fast.backend == "openvino"
    if cpu_has_native_bf16():
        assert fast.precision == "bf16", "the fast path must be the one tested"


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_fast_backends_agree_with_fp32_within_tolerance(scoring_checkpoint, images, fast, fp32, backend):
    ref = _eager_reference(scoring_checkpoint, images)
    if backend == "openvino":
        p = fast
    else:
        p = Predictor.from_checkpoint(scoring_checkpoint, device="cpu", backend="torch", batch_size=4)
    assert p.backend == backend
    if cpu_has_native_bf16():
        assert p.precision == "bf16", "the fast path must be the one tested"
    got = p.predict(images)
    assert np.abs(got - ref).max() < PROB_TOLERANCE
    probs, cams = p.predict_with_cams(images)
    np.testing.assert_allclose(probs, got, atol=1e-6)
    _, cams_ref = fp32.predict_with_cams(images)
    S = SCORING_IMAGE_SIZE
    assert cams.shape == cams_ref.shape == (len(images), 14, S, S)
    # the gradient methods run in eager torch whatever the backend, in bf16 (autocast +
    # channels_last) where the predictor runs bf16 on native-bf16 hardware, else fp32 (where
    # only the batch split, 4 here, moves the float sums). Evaluation scores fp32 maps.
    assert p.cam_method == fp32.cam_method != "cam"
    if p.map_precision == "bf16":  # measured here: mean |diff| 0.017, correlation >= 0.98
        assert np.abs(cams - cams_ref).mean() < 0.03
        flat, flat_ref = cams.reshape(-1, S * S), cams_ref.reshape(-1, S * S)
        assert min(np.corrcoef(a, b)[0, 1] for a, b in zip(flat, flat_ref)) > 0.95
    else:
        np.testing.assert_allclose(cams, cams_ref, atol=0.01)
        assert np.abs(cams - cams_ref).mean() < 1e-4
    # CAM on the backend's own feature map: the same definition, close to fp32
    _, cam_fast = p.predict_with_cams(images, method="cam")
    _, cam_ref = fp32.predict_with_cams(images, method="cam")
    assert cam_fast.shape == (len(images), 14, S, S)
    assert np.abs(cam_fast - cam_ref).mean() < 0.05


def test_openvino_model_is_cached(scoring_checkpoint, fast, monkeypatch):
    import openvino as ov

    def no_convert(*a, **k):
        raise AssertionError("converted again although the weights are cached")

    monkeypatch.setattr(ov, "convert_model", no_convert)
    p = Predictor.from_checkpoint(scoring_checkpoint, device="cpu")
    assert p.backend == "openvino"


@pytest.mark.skipif(
    not (cpu_has_native_bf16() or torch.backends.mkldnn.is_available()),
    reason="this CPU has no bf16 path to disagree with fp32",
)
def test_falls_back_to_fp32_when_a_backend_disagrees(scoring_checkpoint, monkeypatch, caplog):
    monkeypatch.setattr(inference, "PROB_TOLERANCE", 0.0)
    with caplog.at_level(logging.WARNING, logger="medxray.inference"):
        p = Predictor.from_checkpoint(scoring_checkpoint, device="cpu", backend="torch", precision="bf16")
    assert (p.backend, p.precision) == ("torch", "fp32")
    assert "falling back to torch fp32" in caplog.text
    assert p.model.features.conv0.weight.is_contiguous(), "the bf16 channels_last layout is undone"


def test_predictor_thread_safe(fast, images):
    p = fast
    serial = [p.predict_with_cams([a]) for a in images[:6]]
    out: dict[int, tuple] = {}
    errs: list[BaseException] = []

    def work(i):
        try:
            for _ in range(2):
                out[i] = p.predict_with_cams([images[i]])
        except BaseException as exc:  # pragma: no cover
            errs.append(exc)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errs
    for i in range(6):
        np.testing.assert_allclose(out[i][0], serial[i][0], atol=1e-6)
        np.testing.assert_allclose(out[i][1], serial[i][1], atol=1e-6)


def test_gradcam_maps_and_positive(fp32, images):
    probs, gc = fp32.predict_with_cams(images[:2], classes=["Atelectasis", 3], method="gradcam-denseblock4")
    np.testing.assert_allclose(probs, fp32.predict(images[:2]), atol=1e-5)
    assert gc.shape == (2, 2, SCORING_IMAGE_SIZE, SCORING_IMAGE_SIZE)
    assert gc.min() >= 0 and gc.max() <= 1
    with pytest.raises(ConfigError, match="unknown CAM method"):
        fp32.predict_with_cams(images[:1], method="saliency")
    pos = fp32.positive(probs)
    for row, names in zip(probs, pos):
        assert names == [n for n, v in zip(fp32.label_names, row) if v >= 0.5]


def test_cam_classes_by_name_or_index(fp32, images):
    _, by_index = fp32.predict_with_cams(images[:2], classes=[2, 13])
    _, by_name = fp32.predict_with_cams(images[:2], classes=["Effusion", "Hernia"])
    np.testing.assert_array_equal(by_index, by_name)
    with pytest.raises(ConfigError, match="unknown finding"):
        fp32.predict_with_cams(images[:1], classes=["Fracture"])


def test_empty_and_bad_inputs(fp32):
    assert fp32.predict([]).shape == (0, 14)
    with pytest.raises(InputShapeError):
        fp32.predict([np.zeros((4, 4, 3), np.float32)])


def test_unusable_checkpoints(tmp_path, scoring_checkpoint):
    with pytest.raises(CheckpointError):
        Predictor.from_checkpoint(tmp_path / "missing.pt")
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.zeros(2)}, bare)
    with pytest.raises(CheckpointError, match="not a medxray checkpoint"):
        Predictor.from_checkpoint(bare)
    ck = load_checkpoint(scoring_checkpoint)
    other = dict(ck.metadata, preprocessing={**ck.metadata["preprocessing"], "intensity": "something/else"})
    save_checkpoint(tmp_path / "conv.pt", ck.state_dict, other)
    with pytest.raises(CheckpointError, match="intensity convention"):
        Predictor.from_checkpoint(tmp_path / "conv.pt")
    with pytest.raises(ConfigError):
        Predictor.from_checkpoint(scoring_checkpoint, backend="tensorrt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_matches_cpu(scoring_checkpoint, images):
    ref = _eager_reference(scoring_checkpoint, images)
    p = Predictor.from_checkpoint(scoring_checkpoint)  # auto -> cuda, torch, bf16 autocast
    assert p.device.type == "cuda" and p.backend == "torch"
    assert np.abs(p.predict(images) - ref).max() < PROB_TOLERANCE


def test_app_prediction_is_one_forward_and_maps_come_per_finding(fp32, images):
    """The app scores an image with one forward pass and computes a finding's map only when shown
    (a gradient map costs a backward pass per finding); that map is the Predictor's, array for array."""
    from medxray.review.study import finding_map, predict_study

    pred = predict_study(fp32, images[0])
    assert pred.live and pred.cams is None
    np.testing.assert_allclose(pred.probabilities, fp32.predict(images[:1])[0], atol=1e-6)
    m = finding_map(fp32, images[0], "Effusion")
    assert m.shape == (SCORING_IMAGE_SIZE, SCORING_IMAGE_SIZE)
    np.testing.assert_allclose(m, fp32.predict_with_cams(images[:1], classes=["Effusion"])[1][0, 0], atol=1e-6)
    # from the prediction's own network input (what the app page passes): the same map, no second preprocess
    assert pred.network_input is not None and pred.network_input.shape == (3, SCORING_IMAGE_SIZE, SCORING_IMAGE_SIZE)
    np.testing.assert_array_equal(finding_map(fp32, images[0], "Effusion", pred.network_input), m)
