"""Review keys two patients cannot share, and the in-place migration of older databases (issue 19 item 4).

A database written by the previous release (schema version 2: reviews keyed by the SOP Instance UID
alone) is created here with that release's DDL, verbatim, and opened with today's store: it is
migrated in place (version 3, ids, rows and append-only triggers kept) and its reviews are found
under the study + series + SOP key once the app offers the keys of its results folder.
"""

from __future__ import annotations

import io
import sqlite3
import threading
from contextlib import closing

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medxray.review.store import SCHEMA_VERSION, ImageKey, ReviewError, ReviewStore

# The previous release's schema (medxray/review/store.py, SCHEMA_VERSION = 2), verbatim.
V2_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    image_key     TEXT NOT NULL,
    key_kind      TEXT NOT NULL CHECK (key_kind IN ('sop_instance_uid', 'sha256')),
    reviewer      TEXT NOT NULL,
    note          TEXT NOT NULL DEFAULT '',
    model_version TEXT NOT NULL DEFAULT '',
    saved_at_utc  TEXT NOT NULL,
    file_name     TEXT NOT NULL DEFAULT '',
    identity_source TEXT NOT NULL DEFAULT 'typed'
);
CREATE INDEX IF NOT EXISTS reviews_by_image ON reviews (image_key, id);
CREATE TABLE IF NOT EXISTS review_findings (
    review_id   INTEGER NOT NULL REFERENCES reviews (id) ON DELETE CASCADE,
    finding     TEXT NOT NULL,
    verdict     TEXT NOT NULL CHECK (verdict IN ('agree', 'disagree', 'unsure')),
    probability REAL,
    threshold   REAL,
    PRIMARY KEY (review_id, finding)
);
CREATE TRIGGER IF NOT EXISTS reviews_no_update BEFORE UPDATE ON reviews
    BEGIN SELECT RAISE(ABORT, 'reviews are append-only'); END;
CREATE TRIGGER IF NOT EXISTS reviews_no_delete BEFORE DELETE ON reviews
    BEGIN SELECT RAISE(ABORT, 'reviews are append-only'); END;
CREATE TRIGGER IF NOT EXISTS findings_no_update BEFORE UPDATE ON review_findings
    BEGIN SELECT RAISE(ABORT, 'reviews are append-only'); END;
CREATE TRIGGER IF NOT EXISTS findings_no_delete BEFORE DELETE ON review_findings
    BEGIN SELECT RAISE(ABORT, 'reviews are append-only'); END;
"""

SOP_X = "1.2.826.0.1.3680043.8.498.100"  # reviewed twice before the upgrade
SOP_Y = "1.2.826.0.1.3680043.8.498.200"  # re-used by two studies (two patients) in the results folder
PNG_SHA = "ab" * 32
STUDY_1, SERIES_1 = "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12"
STUDY_2, SERIES_2 = "1.2.826.0.1.3680043.8.498.21", "1.2.826.0.1.3680043.8.498.22"


def write_v2_database(folder) -> None:
    """A version-2 review database, written the way the previous release's ``ReviewStore.save`` did."""
    folder.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(folder / "reviews.sqlite3", isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(V2_SCHEMA)
        reviews = [
            (1, SOP_X, "sop_instance_uid", "Dr A", "", "m1", "2026-01-02T10:00:00+00:00", "x.dcm", "typed"),
            (
                2,
                SOP_Y,
                "sop_instance_uid",
                "Dr A",
                "which patient?",
                "m1",
                "2026-01-02T10:01:00+00:00",
                "y.dcm",
                "typed",
            ),
            (3, PNG_SHA, "sha256", "Dr B", "", "m1", "2026-01-02T10:02:00+00:00", "00000013_005.png", "typed"),
            (
                4,
                SOP_X,
                "sop_instance_uid",
                "Dr C",
                "second look",
                "m1",
                "2026-01-03T09:00:00+00:00",
                "x.dcm",
                "proxy header",
            ),
        ]
        findings = [
            (1, "Mass", "agree", 0.71, 0.5),
            (1, "Effusion", "unsure", 0.4, 0.5),
            (2, "Mass", "agree", 0.6, 0.5),
            (3, "Nodule", "disagree", 0.55, 0.5),
            (4, "Mass", "disagree", 0.71, 0.5),
            (4, "Effusion", "unsure", 0.4, 0.5),
        ]
        conn.executemany(
            "INSERT INTO reviews (id, image_key, key_kind, reviewer, note, model_version, saved_at_utc,"
            " file_name, identity_source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            reviews,
        )
        conn.executemany("INSERT INTO review_findings VALUES (?, ?, ?, ?, ?)", findings)
        conn.execute("PRAGMA user_version=2")


def key(study: str, series: str, sop: str) -> ImageKey:
    k = ImageKey.from_uids(study, series, sop)
    assert k is not None
    return k


def test_a_version_2_database_is_migrated_in_place_and_found_under_the_new_keys(tmp_path):
    write_v2_database(tmp_path / "rev")
    store = ReviewStore(tmp_path / "rev")
    with closing(sqlite3.connect(store.path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT id, image_key, key_kind FROM reviews ORDER BY id").fetchall() == [
            (1, SOP_X, "sop_instance_uid"),
            (2, SOP_Y, "sop_instance_uid"),
            (3, PNG_SHA, "sha256"),
            (4, SOP_X, "sop_instance_uid"),
        ]  # rows kept as saved
        for sql in ("UPDATE reviews SET reviewer = 'x'", "DELETE FROM reviews", "DELETE FROM review_findings"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                conn.execute(sql)  # the rebuilt table is append-only too
    assert store.count() == 4
    assert store.latest(PNG_SHA).reviewer == "Dr B"  # hash keys need no adoption

    # the app offers the keys of a results folder: X belongs to one study, Y to two (two patients)
    x1, y1, y2 = key(STUDY_1, SERIES_1, SOP_X), key(STUDY_1, SERIES_1, SOP_Y), key(STUDY_2, SERIES_2, SOP_Y)
    latest = store.latest_by_image(adopt=[x1.value, y1.value, y2.value, None, PNG_SHA])
    assert set(latest) == {x1.value, SOP_Y, PNG_SHA}
    assert latest[x1.value].reviewer == "Dr C" and latest[x1.value].verdicts == {
        "Mass": "disagree",
        "Effusion": "unsure",
    }
    assert latest[x1.value].key_kind == "study_series_sop" and latest[x1.value].identity_source == "proxy header"
    assert store.latest(y1.value) is None and store.latest(y2.value) is None  # ambiguous: nobody gets it
    assert [r.reviewer for r in store.history(x1.value)] == ["Dr A", "Dr C"]
    hist = list(store.iter_history_rows(x1.value))
    assert [(h["change"], h["finding"], h["previous"], h["new"]) for h in hist] == [
        ("first review", "Mass", "", "agree"),
        ("first review", "Effusion", "", "unsure"),
        ("verdict", "Mass", "agree", "disagree"),
        ("note", "", "", "second look"),
    ]
    assert store.latest(SOP_X) is None  # the old key is not a key any more
    export = store.export_csv()
    assert f"{x1.value}," in export and "study_series_sop" in export

    # a reviewer continues on the migrated key; the history goes on under it
    store.save(x1, {"Mass": "agree"}, reviewer="Dr D", file_name="x.dcm")
    assert [r.reviewer for r in store.history(x1.value)] == ["Dr A", "Dr C", "Dr D"]
    # reopening (app restart) migrates nothing twice and keeps the adoption; offering again adopts nothing
    again = ReviewStore(tmp_path / "rev")
    assert again.adopt_legacy([x1.value]) == 0 and again.latest(x1.value).reviewer == "Dr D"
    assert again.count() == 5


def test_a_sop_uid_used_by_a_study_already_reviewed_under_the_new_key_is_not_adopted(tmp_path):
    write_v2_database(tmp_path / "rev")
    store = ReviewStore(tmp_path / "rev")
    x2 = key(STUDY_2, SERIES_2, SOP_X)  # another patient's image with X's SOP UID, reviewed after the upgrade
    store.save(x2, {"Mass": "unsure"}, reviewer="Dr E")
    assert store.adopt_legacy([key(STUDY_1, SERIES_1, SOP_X)]) == 0  # X now names two studies: left alone
    assert [r.reviewer for r in store.history(x2.value)] == ["Dr E"]
    assert store.adopt_legacy([key(STUDY_1, SERIES_1, SOP_Y)]) == 1  # Y is unambiguous here
    assert store.latest(key(STUDY_1, SERIES_1, SOP_Y).value).note == "which patient?"


def test_two_processes_opening_a_version_2_database_at_once_migrate_it_once(tmp_path):
    write_v2_database(tmp_path / "rev")
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_store() -> None:
        try:
            barrier.wait()
            ReviewStore(tmp_path / "rev")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = ReviewStore(tmp_path / "rev")
    assert store.count() == 4
    with closing(sqlite3.connect(store.path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM review_findings").fetchone()[0] == 6


def test_keys_that_two_patients_could_share_are_refused(tmp_path):
    store = ReviewStore(tmp_path)
    for bad in (
        ImageKey(SOP_X, "sop_instance_uid"),
        ImageKey("1.2/1.3", "study_series_sop"),
        ImageKey("x/y/z", "study_series_sop"),
    ):
        with pytest.raises(ReviewError, match="invalid image key"):
            store.save(bad, {"Mass": "agree"}, reviewer="A")
    assert ImageKey.from_uids(STUDY_1, SERIES_1, "") is None
    assert ImageKey.from_uids(STUDY_1, "01.2", SOP_X) is None  # not a valid UID (PS3.5 9.1)
    with pytest.raises(ReviewError, match="Study, Series and SOP Instance UIDs"):
        ImageKey.for_image(SOP_X)
    assert store.count() == 0


def test_real_images_sharing_a_sop_uid_get_two_keys_in_the_study_view_and_the_worklist(tmp_path):
    """The app's two callers (an opened image, a results row) build the same key, and two patients' two."""
    from medxray.review.study import load_study_bytes
    from medxray.review.worklist import row_image_key

    src = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    keys = []
    for study, series, patient in ((STUDY_1, SERIES_1, "Alpha"), (STUDY_2, SERIES_2, "Beta")):
        src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID = study, series, SOP_X
        src.file_meta.MediaStorageSOPInstanceUID = SOP_X
        src.PatientName = patient
        buf = io.BytesIO()
        src.save_as(buf, enforce_file_format=True)
        opened = load_study_bytes(buf.getvalue(), "x.dcm")
        row = {
            "path": "x.dcm",
            "status": "ok",
            "sop_instance_uid": SOP_X,
            "study_instance_uid": study,
            "series_instance_uid": series,
        }
        assert opened.key.value == row_image_key(tmp_path, row) == f"{study}/{series}/{SOP_X}"
        keys.append(opened.key)
    assert keys[0] != keys[1]
    store = ReviewStore(tmp_path / "rev")
    store.save(keys[0], {"Mass": "agree"}, reviewer="Dr A")
    store.save(keys[1], {"Mass": "disagree"}, reviewer="Dr B")
    assert store.latest(keys[0].value).reviewer == "Dr A" and store.latest(keys[1].value).reviewer == "Dr B"


# ---- the app: a review says when the file under its key has changed ------------------------


@pytest.mark.slow
def test_study_page_warns_when_the_file_changed_since_its_review(tmp_path, monkeypatch):
    """Real Streamlit page (AppTest): a review saved on RG1, then a changed re-send with RG1's UIDs."""
    import hashlib
    import re

    from app_helpers import APP_ENTRY, make_checkpoint, rg1_bytes
    from streamlit.testing.v1 import AppTest

    from medxray.review.settings import ENV_BACKEND, ENV_CHECKPOINT, ENV_MAX_UPLOAD_MB, ENV_RESULTS, ENV_REVIEWS
    from medxray.review.ui_study import CHANGED_SINCE_REVIEW

    monkeypatch.setenv(ENV_CHECKPOINT, str(make_checkpoint(tmp_path / "model.pt")))
    monkeypatch.setenv(ENV_REVIEWS, str(tmp_path / "reviews"))
    for name in (ENV_RESULTS, ENV_MAX_UPLOAD_MB, ENV_BACKEND):
        monkeypatch.delenv(name, raising=False)

    def texts(elements) -> str:  # as a reader sees them (md_escape's backslashes removed)
        return " | ".join(re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", str(e.value)).replace("\u2060", "") for e in elements)

    def open_file(data: bytes) -> AppTest:
        at = AppTest.from_file(str(APP_ENTRY), default_timeout=120).run()
        at.file_uploader(key="upload").set_value(("RG1_UNCI.dcm", data, "application/octet-stream"))
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    original = rg1_bytes()
    at = open_file(original)
    at.text_input(key="reviewer_name").set_value("Dr Test")
    at.radio(key=next(r.key for r in at.radio if r.key.startswith("verdict_"))).set_value("agree")
    at.button(key="save_review").click().run()
    assert "Review saved" in texts(at.success)
    store = ReviewStore(tmp_path / "reviews")
    (saved,) = store.latest_by_image().values()
    assert saved.content_sha256 == hashlib.sha256(original).hexdigest()
    assert saved.key_kind == "study_series_sop"
    assert CHANGED_SINCE_REVIEW not in texts(open_file(original).warning)  # the same file: no warning

    ds = pydicom.dcmread(io.BytesIO(original))  # a changed re-send: same UIDs, cropped pixels
    arr = ds.pixel_array[:1500, :1400].copy()
    ds.Rows, ds.Columns, ds.PixelData = 1500, 1400, arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    at = open_file(buf.getvalue())
    assert "Last reviewed by Dr Test" in texts(at.caption)  # the same image key ...
    assert CHANGED_SINCE_REVIEW in texts(at.warning)  # ... and the page says the file is not the one reviewed
