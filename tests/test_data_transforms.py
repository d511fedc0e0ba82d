"""The deterministic list and the training list: bit depth, shape, orientation, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from PIL import Image

from medxray.data.imageio import read_image
from medxray.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    deterministic_transforms,
    preprocess_array,
    train_transforms,
)
from medxray.errors import DataError


def _picture(h: int = 120, w: int = 80) -> np.ndarray:
    """[0, 1] image, bright top-left block, mid-grey elsewhere: catches transposes and flips."""
    a = np.full((h, w), 0.25, np.float32)
    a[: h // 3, : w // 4] = 1.0
    return a


def _gray_of(t: torch.Tensor) -> torch.Tensor:
    return t[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]


@pytest.mark.parametrize("bits", [8, 16])
def test_png_8_and_16_bit_give_the_same_tensor(tmp_path, bits):
    pic = _picture()
    if bits == 8:
        Image.fromarray(np.rint(pic * 255).astype(np.uint8)).save(tmp_path / "x.png")
    else:
        Image.fromarray(np.rint(pic * 65535).astype(np.uint16)).save(tmp_path / "x.png")
    arr, hw = read_image(tmp_path / "x.png")
    assert arr.dtype == (np.uint8 if bits == 8 else np.uint16) and hw == (120, 80)
    from_file = Compose(deterministic_transforms(40))({"image": str(tmp_path / "x.png")})["image"]
    from_arr = Compose(deterministic_transforms(40, from_file=False))({"image": arr})["image"]
    ref = preprocess_array(pic, 40)
    for t in (from_file, from_arr):
        assert t.shape == (3, 40, 40) and t.dtype == torch.float32
        assert torch.allclose(t, ref, atol=0.01)  # 8-bit quantisation: 1/255 / std
        g = _gray_of(t)
        assert g[0, 0] > 0.95 and g[-1, -1] < 0.3 and g[0, -1] < 0.3  # rows stay rows: not transposed
        gray = [t[c] * IMAGENET_STD[c] + IMAGENET_MEAN[c] for c in range(3)]  # one gray image, 3 normalisations
        assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[1], gray[2], atol=1e-5)


def test_rgba_palette_and_bad_files(tmp_path):
    pic = np.rint(_picture() * 255).astype(np.uint8)
    Image.fromarray(np.stack([pic] * 3 + [np.full_like(pic, 255)], -1), mode="RGBA").save(tmp_path / "rgba.png")
    arr, _ = read_image(tmp_path / "rgba.png")
    assert arr.dtype == np.uint8 and np.array_equal(arr, pic)
    (tmp_path / "txt.png").write_text("hello")
    with pytest.raises(DataError, match="not an image"):
        read_image(tmp_path / "txt.png")
    good = (tmp_path / "rgba.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="truncated|unreadable"):
        read_image(tmp_path / "cut.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(DataError, match="at least"):
        read_image(tmp_path / "tiny.png")
    Image.fromarray(np.zeros((64, 64), np.float32), mode="F").save(tmp_path / "float.tif")
    with pytest.raises(DataError, match="unsupported pixel format"):
        read_image(tmp_path / "float.tif")
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "absent.png")


def test_train_list_extends_the_deterministic_list_and_is_seedable():
    det = deterministic_transforms(48, from_file=False)
    tr = train_transforms(48, from_file=False)
    assert [type(t) for t in tr[: len(det)]] == [type(t) for t in det]
    assert len(tr) > len(det)
    pic = _picture()

    def run(seed):
        c = Compose(train_transforms(48, from_file=False))
        c.set_random_state(seed=seed)
        return torch.stack([c({"image": pic})["image"] for _ in range(6)])

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (6, 3, 48, 48) and a.dtype == torch.float32 and type(a) is torch.Tensor
    assert torch.equal(a, b) and not torch.equal(a, c)
    ref = preprocess_array(pic, 48)
    assert any(not torch.allclose(x, ref) for x in a)  # something random happened
    # mild: the bright block stays in the top half of the image in every sample
    for x in a:
        g = _gray_of(x)
        top, bottom = g[:24].mean(), g[24:].mean()
        assert top > bottom


def test_flip_only_is_left_right_and_can_be_switched_off():
    pic = _picture()
    c = Compose(train_transforms(48, from_file=False, rotate_deg=0, scale=0, translate=0, brightness=0, contrast=0))
    c.set_random_state(seed=3)
    ref = preprocess_array(pic, 48)
    outs = [c({"image": pic})["image"] for _ in range(12)]
    flipped = [o for o in outs if not torch.allclose(o, ref)]
    assert flipped and all(torch.allclose(o, torch.flip(ref, dims=[2])) for o in flipped)
    off = Compose(
        train_transforms(48, from_file=False, rotate_deg=0, scale=0, translate=0, brightness=0, contrast=0, hflip=False)
    )
    assert all(torch.allclose(off({"image": pic})["image"], ref) for _ in range(4))


@pytest.mark.parametrize("shape,size", [((300, 260), 64), ((256, 256), 224), ((40, 50), 64), ((64, 64), 64)])
def test_fused_transforms_equal_the_monai_originals(shape, size):
    """The convention is unchanged: same numbers as Resized(area) + RepeatChanneld + NormalizeIntensityd."""
    from monai.transforms import EnsureChannelFirstd, EnsureTyped, NormalizeIntensityd, RepeatChanneld, Resized

    from medxray.data.transforms import ScaleByBitDepthd

    arr = np.random.default_rng(0).integers(0, 256, size=shape).astype(np.uint8)
    monai_list = Compose(
        [
            EnsureChannelFirstd("image", channel_dim="no_channel"),
            ScaleByBitDepthd("image"),
            Resized("image", spatial_size=(size, size), mode="area"),
            RepeatChanneld("image", repeats=3),
            NormalizeIntensityd(
                "image",
                subtrahend=np.asarray(IMAGENET_MEAN, np.float32),
                divisor=np.asarray(IMAGENET_STD, np.float32),
                channel_wise=True,
            ),
            EnsureTyped("image", data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )
    ours = Compose(deterministic_transforms(size, from_file=False))({"image": arr})["image"]
    ref = monai_list({"image": arr})["image"]
    assert type(ours) is torch.Tensor and ours.dtype == torch.float32 and ours.shape == (3, size, size)
    assert torch.allclose(ours, torch.as_tensor(ref), atol=1e-6)


def test_rand_small_affine_identity_and_shift():
    from medxray.data.transforms import RandSmallAffined

    x = torch.zeros(3, 40, 40)
    x[:, 10:20, 10:20] = 1.0
    ident = RandSmallAffined("image", prob=1.0, rotate_deg=0, scale=0, translate=0)
    assert torch.allclose(ident({"image": x})["image"], x, atol=1e-5)
    shift = RandSmallAffined("image", prob=1.0, rotate_deg=0, scale=0, translate=0.25)
    shift.set_random_state(seed=0)
    moved = shift({"image": x})["image"]
    assert moved.shape == x.shape and not torch.allclose(moved, x)
    assert abs(moved.sum().item() - x.sum().item()) < 0.05 * x.sum().item()  # shifted, not scaled away
    never = RandSmallAffined("image", prob=0.0, rotate_deg=30)
    assert never({"image": x})["image"] is x
