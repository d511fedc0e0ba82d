"""What the Study page shows, without Streamlit: display windowing, presets, invert, zoom and pan,
the findings table and chart, and the out-of-distribution warnings."""

from __future__ import annotations

import app_helpers
import numpy as np
import pandas as pd
import pytest
from app_images import chest_like, png_of

from medxray.labels import CHESTXRAY14_FINDINGS
from medxray.review import ImageKey
from medxray.review.study import (
    DISPLAY_MAX_SIDE,
    StudyImage,
    display_image,
    distribution_warnings,
    findings_table,
    load_study_bytes,
    probability_figure,
    safe_metadata_table,
    window_range,
)


@pytest.fixture(scope="module")
def rg1_bytes() -> bytes:
    return app_helpers.rg1_bytes()  # pydicom-data's RG1_UNCI.dcm, a real MONOCHROME1 chest CR


def test_dicom_display_rewindows_from_raw_values(rg1_bytes):
    s = load_study_bytes(rg1_bytes, "RG1_UNCI.dcm")
    default = display_image(s, None)
    assert max(default.shape) == DISPLAY_MAX_SIDE
    same = display_image(s, s.window)
    assert np.abs(same - default).mean() < 0.01  # the default window reproduces the decoder's image
    lo, hi = window_range(s)
    narrow = display_image(s, ((lo + hi) / 2, (hi - lo) / 20))
    assert np.abs(narrow - default).mean() > 0.05
    # MONOCHROME1: higher raw values are darker on screen, so a window above everything is all white
    assert display_image(s, (hi + 10 * (hi - lo), 1.0)).min() == pytest.approx(1.0)


def test_window_presets_invert_zoom_and_spacing(rg1_bytes):
    from medxray.review.viewing import (
        PRESETS,
        ViewState,
        apply_view,
        cam_view,
        crop_box,
        preset_window,
        spacing_text,
        window_text,
    )

    study = load_study_bytes(rg1_bytes, "RG1_UNCI.dcm")
    assert PRESETS == ("File default", "Lung", "Mediastinum", "Bone")
    assert preset_window(study, "File default") is None
    lung, bone = preset_window(study, "Lung"), preset_window(study, "Bone")
    # RG1 is MONOCHROME1: bright on screen = low stored values, so bone sits below lung in stored units
    assert bone[0] < lung[0]
    img = display_image(study, lung)
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.1
    assert "stored values" in window_text(study, lung)
    png = load_study_bytes(png_of(chest_like()), "x.png")
    c, w = preset_window(png, "Lung")
    assert 0 < c < 1 and "% of the grey range" in window_text(png, (c, w))
    assert not np.allclose(display_image(png, (c, w)), display_image(png))
    d = display_image(study)
    inv = apply_view(d, ViewState(invert=True))
    assert np.allclose(inv, 1.0 - d)
    z = apply_view(d, ViewState(zoom=2.0, center_x=0.0, center_y=1.0))
    assert z.shape == (round(d.shape[0] / 2), round(d.shape[1] / 2))
    _top, bottom, left, _right = crop_box(d.shape, 2.0, 0.0, 1.0)
    assert left == 0 and bottom == d.shape[0]  # pan is clamped inside the image
    cam = np.zeros((4, 4), np.float32)
    cam[3, 0] = 1.0  # evidence bottom-left: still inside the zoomed bottom-left crop
    rgb = cam_view(d, cam, ViewState(zoom=2.0, center_x=0.0, center_y=1.0), finding="Mass")
    assert rgb.shape[0] == z.shape[0] and rgb.shape[1] > z.shape[1]  # image plus its colour bar
    assert spacing_text([0.0, 0.0]) == "unknown" and spacing_text(None) == "unknown"
    assert spacing_text([0.139, 0.139]) == "0.139 x 0.139 mm"
    meta = dict(zip(safe_metadata_table(study)["field"], safe_metadata_table(study)["value"]))
    assert meta["pixel spacing"] == "unknown"  # RG1 says 0, 0


def test_findings_table_follows_thresholds_and_sorts():
    labels = ["A", "B", "C"]
    t = findings_table(labels, [0.2, 0.9, 0.5], {"A": 0.1, "B": 0.95, "C": 0.5})
    assert list(t["finding"]) == ["B", "C", "A"]
    assert dict(zip(t["finding"], t["positive"])) == {"A": True, "B": False, "C": True}
    with pytest.raises(ValueError):
        findings_table(labels, [0.1], {})


def test_findings_table_names_and_bar_columns():
    t = findings_table(["Pleural_Thickening", "Mass"], [0.7, 0.2], {"Pleural_Thickening": 0.5, "Mass": 0.5})
    assert list(t["name"]) == ["Pleural thickening", "Mass"]
    assert t.loc[0, "above"] == pytest.approx(0.7) and pd.isna(t.loc[0, "below"])
    assert t.loc[1, "below"] == pytest.approx(0.2) and pd.isna(t.loc[1, "above"])


def test_probability_figure_marks_every_threshold():
    t = findings_table(list(CHESTXRAY14_FINDINGS), np.linspace(0, 1, 14), {})
    fig = probability_figure(t)
    ax = fig.axes[0]
    assert len(ax.patches) == 14 and len(ax.lines) == 14
    assert all(line.get_xdata()[0] == pytest.approx(0.5) for line in ax.lines)


def _study(pixels, **meta):
    return StudyImage(
        pixels=pixels.astype(np.float32),
        kind="dicom",
        key=ImageKey("1", "sop_instance_uid"),
        sha256="0" * 64,
        meta=meta,
    )


def test_distribution_warnings():
    rng = np.random.default_rng(0)
    good = rng.uniform(0.2, 0.8, (1024, 1024))
    assert (
        distribution_warnings(_study(good, modality="CR", view_position="PA", body_part="CHEST"), image_size=224) == []
    )
    w = distribution_warnings(_study(good, modality="MR", view_position="LL", body_part="KNEE"))
    assert any(x.startswith("lateral view") for x in w)
    assert any("modality MR" in x for x in w) and any("body part KNEE" in x for x in w)
    assert any(x.startswith("AP view") for x in distribution_warnings(_study(good, view_position="AP")))
    small = distribution_warnings(_study(rng.uniform(0.2, 0.8, (120, 400))))
    assert any("small image" in x for x in small) and any("unusual shape" in x for x in small)
    dark = distribution_warnings(_study(np.full((512, 512), 0.02)))
    assert any("brightness" in x for x in dark) and any("low contrast" in x for x in dark)
