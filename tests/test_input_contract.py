"""One input contract: every entry point turns the same radiograph into the same network input, or refuses it
the same way.

The radiograph is a real NIH ChestX-ray14 PNG from ../shared/datasets/chestxray14-sample when that is beside the
clone, else a phantom (medxray.data.synthetic). It is fed as uint8, uint16 (x 257, so the same [0, 1] values),
float32 / float64 in [0, 1] (accepted) and float in [0, 255], bool, NaN, negative int16, complex (refused) through
the MONAI dictionary list, the decode workers' function (medxray.modelinput.model_input), preprocess_array,
inference.preprocess, Predictor.preprocess / predict / predict_with_cams. The reference network input is written out
by hand here (float64 area resize, ImageNet mean / std), not taken from the code under test.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import NIH_SAMPLE, SCORING_IMAGE_SIZE
from monai.transforms import Compose
from PIL import Image

from medxray.data.transforms import ScaleByBitDepthd, deterministic_transforms, preprocess_array
from medxray.errors import DataError, ImageValueError, InputShapeError
from medxray.inference import Predictor, preprocess
from medxray.modelinput import IMAGENET_MEAN, IMAGENET_STD, model_input, unit_range

SIZE = SCORING_IMAGE_SIZE
ATOL = 1e-4  # float32 arithmetic against the float64 reference (~1e-6 relative, over std 0.225)


@pytest.fixture(scope="module")
def radiograph() -> np.ndarray:
    """A 2-D uint8 radiograph: a real NIH PNG when available, else a 1024 x 1024 phantom."""
    from medxray.data.imageio import read_image

    if NIH_SAMPLE.is_dir():
        img = read_image(sorted(NIH_SAMPLE.glob("*.png"))[0])[0]
    else:
        from medxray.data.synthetic import render_phantom

        img = render_phantom(["Cardiomegaly", "Nodule"], [7, 1])[0]
    assert img.dtype == np.uint8 and img.ndim == 2 and img.std() > 10  # a picture, not a blank
    return img


@pytest.fixture(scope="module")
def predictor(scoring_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(scoring_checkpoint, device="cpu", backend="torch", precision="fp32")


def reference_input(u8: np.ndarray) -> np.ndarray:
    """The network input by hand: /255, area resize (float64), 3 channels, ImageNet normalisation."""
    x = torch.from_numpy(u8.astype(np.float64) / 255.0)[None, None]
    small = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="area")[0, 0].numpy()
    mean = np.asarray([0.485, 0.456, 0.406]).reshape(3, 1, 1)
    std = np.asarray([0.229, 0.224, 0.225]).reshape(3, 1, 1)
    return ((small[None] - mean) / std).astype(np.float32)


def accepted_forms(u8: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "uint8": u8,
        "uint16": u8.astype(np.uint16) * np.uint16(257),  # v * 257 / 65535 == v / 255 exactly
        "float32 [0, 1]": u8.astype(np.float32) / np.float32(255),
        "float64 [0, 1]": u8 / 255.0,
    }


def refused_forms(u8: np.ndarray) -> dict[str, tuple[np.ndarray, str]]:
    nan = u8 / 255.0
    nan[3, 5] = np.nan
    return {
        "float [0, 255]": (u8.astype(np.float32), r"in \[0, 255\].*divide 8-bit values by 255"),
        "bool": (u8 > 128, "boolean"),
        "NaN": (nan, "NaN"),
        "negative int16": (u8.astype(np.int16) - 128, "outside 0..65535"),
        "complex": ((u8 / 255.0).astype(np.complex64), "complex"),
    }


def entry_points(predictor: Predictor) -> dict[str, object]:
    """name -> function(image) -> (3, S, S) float32 network input, for every path an array takes."""
    monai_list = Compose(deterministic_transforms(SIZE, from_file=False))
    return {
        "MONAI list": lambda a: np.asarray(monai_list({"image": a})["image"]),
        "decode workers (model_input)": lambda a: model_input(a, SIZE),
        "preprocess_array": lambda a: preprocess_array(a, SIZE).numpy(),
        "inference.preprocess": lambda a: preprocess(a, SIZE).numpy(),
        "Predictor.preprocess": lambda a: predictor.preprocess([a])[0].numpy(),
    }


def refusal(fn, arr) -> tuple[type, str]:
    """(error type, message) of a refused input; MONAI's Compose wraps a transform's error in RuntimeError."""
    with pytest.raises(Exception) as info:
        fn(arr)
    err = info.value
    if type(err) is RuntimeError and err.__cause__ is not None:
        err = err.__cause__
    return type(err), str(err)


def test_every_entry_point_gives_the_same_network_input_for_every_accepted_dtype(radiograph, predictor):
    ref = reference_input(radiograph)
    assert ref.min() < -1.0 and ref.max() > 1.0  # a real spread: the normalised radiograph, not a saturated one
    for form, arr in accepted_forms(radiograph).items():
        one = model_input(arr, SIZE)
        for name, fn in entry_points(predictor).items():
            got = fn(arr)
            assert got.shape == (3, SIZE, SIZE) and got.dtype == np.float32, (form, name)
            err = float(np.abs(got - ref).max())
            assert err <= ATOL, f"{name} on {form}: max |diff| {err}"
            # one definition: the same arithmetic on every path, so evaluation, the app and the scorer agree bit
            # for bit (what evaluation scores is what the app shows)
            assert np.array_equal(got, one), f"{name} on {form} is not the input contract's own result"


def test_every_entry_point_refuses_the_same_inputs_with_the_same_message(radiograph, predictor):
    points = entry_points(predictor)
    for form, (arr, pattern) in refused_forms(radiograph).items():
        seen = {name: refusal(fn, arr) for name, fn in points.items()}
        for name, (kind, msg) in seen.items():
            assert kind is ImageValueError, f"{name} on {form}: {kind.__name__}: {msg}"
            assert issubclass(kind, DataError) and issubclass(kind, ValueError)
        assert len({msg for _, msg in seen.values()}) == 1, (form, seen)
        assert re.search(pattern, next(iter(seen.values()))[1]), (form, seen)


def test_predict_and_maps_are_the_same_for_uint8_and_the_same_image_over_255(radiograph, predictor):
    """The measured bug: a uint8 image given to Predictor.predict was clipped as if already in [0, 1]."""
    forms = accepted_forms(radiograph)
    p_u8 = predictor.predict([forms["uint8"]])
    p_f = predictor.predict([forms["float32 [0, 1]"]])
    assert p_u8.shape == (1, len(predictor.label_names))
    np.testing.assert_allclose(p_u8, p_f, atol=1e-5)
    saturated = predictor.predict([np.ones_like(radiograph, np.float32)])  # what the bug scored: almost all white
    assert np.abs(p_u8 - saturated).max() > 0.01
    np.testing.assert_allclose(predictor.predict([forms["uint16"]]), p_f, atol=1e-5)

    pu, mu = predictor.predict_with_cams([forms["uint8"]], classes=[0, 3])
    pf, mf = predictor.predict_with_cams([forms["float64 [0, 1]"]], classes=[0, 3])
    np.testing.assert_allclose(pu, p_f, atol=1e-5)
    np.testing.assert_allclose(pf, p_f, atol=1e-5)
    assert mu.shape == mf.shape == (1, 2, SIZE, SIZE)
    np.testing.assert_allclose(mu, mf, atol=1e-4)
    for arr, _ in refused_forms(radiograph).values():
        with pytest.raises(ImageValueError):
            predictor.predict([arr])
        with pytest.raises(ImageValueError):
            predictor.predict_with_cams([arr], classes=[0])


def test_the_monai_list_from_8_and_16_bit_png_files_gives_the_same_input(radiograph, tmp_path):
    ref = reference_input(radiograph)
    Image.fromarray(radiograph).save(tmp_path / "u8.png")
    Image.fromarray(radiograph.astype(np.uint16) * np.uint16(257)).save(tmp_path / "u16.png")
    from_file = Compose(deterministic_transforms(SIZE))
    for name in ("u8.png", "u16.png"):
        got = np.asarray(from_file({"image": str(tmp_path / name)})["image"])
        assert float(np.abs(got - ref).max()) <= ATOL, name


def test_decode_worker_input_is_the_predictors_for_a_dicom_file():
    """The scorer's decode job (spawned workers run it) and the Predictor give one network input for a DICOM."""
    from pydicom.data import get_testdata_file

    from medxray.dicom import read_dicom
    from medxray.scoring.messages import DecodedImage
    from medxray.scoring.workers import decode_job

    path = get_testdata_file("RG1_UNCR.dcm")
    rec = decode_job(path, SIZE, None, None, True)
    assert isinstance(rec, DecodedImage)
    pixels = read_dicom(path, keep_raw=False).pixels
    assert pixels.dtype == np.float32 and 0.0 <= pixels.min() and pixels.max() <= 1.0
    assert np.array_equal(rec.x, preprocess(pixels, SIZE).numpy())


def test_unit_range_rules():
    """Integers by bit depth (8 for 1-byte types, 16 for wider, bits_stored when known); floats within a tiny
    tolerance of [0, 1] clipped, beyond it refused; not-2-D refused by the array function."""
    np.testing.assert_array_equal(unit_range(np.array([[0, 255]], np.uint8)), [[0.0, 1.0]])
    np.testing.assert_array_equal(unit_range(np.array([[0, 65535]], np.uint16)), [[0.0, 1.0]])
    np.testing.assert_array_equal(unit_range(np.array([[0, 65535]], np.int32)), [[0.0, 1.0]])  # PIL's 16-bit PNG
    np.testing.assert_array_equal(unit_range(np.array([[0, 4095]], np.uint16), bits_stored=12), [[0.0, 1.0]])
    with pytest.raises(ImageValueError, match="outside 0..4095 of 12-bit"):
        unit_range(np.array([[0, 4096]], np.uint16), bits_stored=12)
    with pytest.raises(ImageValueError, match="bits_stored=12 does not fit a uint8"):
        unit_range(np.array([[0, 1]], np.uint8), bits_stored=12)
    with pytest.raises(ImageValueError, match="outside 0..65535"):
        unit_range(np.array([[0, 70000]], np.int32))
    np.testing.assert_array_equal(unit_range(np.array([[-5e-4, 1 + 5e-4]], np.float32)), [[0.0, 1.0]])
    with pytest.raises(ImageValueError, match="divide"):
        unit_range(np.array([[0.0, 1.002]], np.float32))
    with pytest.raises(ImageValueError, match="empty"):
        unit_range(np.zeros((0, 4), np.float32))
    with pytest.raises(ImageValueError, match="dtype <U1"):
        unit_range(np.array([["a"]]))
    with pytest.raises(InputShapeError, match="2-D"):
        model_input(np.zeros((8, 8, 3), np.uint8), SIZE)
    # the dictionary wrapper keeps the container type and applies bits_stored
    t = ScaleByBitDepthd("image", bits_stored=12)({"image": torch.tensor([[4095, 0]], dtype=torch.int32)})["image"]
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.tolist() == [[1.0, 0.0]]
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
