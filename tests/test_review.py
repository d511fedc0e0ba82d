"""Review store: durable, one transaction per save, keyed without patient identifiers."""

from __future__ import annotations

import csv
import io
import sqlite3
import threading
from contextlib import closing

import pytest

from medxray.errors import DataError, MedxrayError
from medxray.review.store import EXPORT_COLUMNS, ImageKey, ReviewError, ReviewStore

UID = "1.2.826.0.1.3680043.8.498.1"
KEY = ImageKey.from_uids("1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3", UID)  # study + series + SOP


def test_save_and_reload_survives_a_new_store(tmp_path):
    store = ReviewStore(tmp_path / "rev")
    key = ImageKey.for_image(
        UID, study_instance_uid=KEY.value.split("/")[0], series_instance_uid=KEY.value.split("/")[1]
    )
    assert key == KEY
    saved = store.save(
        key,
        {"Effusion": "agree", "Mass": "disagree", "Nodule": ""},
        reviewer="Dr A",
        note="small left effusion",
        model_version="m1",
        probabilities={"Effusion": 0.81, "Mass": 0.6},
        thresholds={"Effusion": 0.5, "Mass": 0.4},
    )
    assert saved.verdicts == {"Effusion": "agree", "Mass": "disagree"}  # empty choice = not reviewed
    # A fresh store object on the same folder (= app restart) sees the same review.
    again = ReviewStore(tmp_path / "rev").latest(KEY.value)
    assert again is not None
    assert again.reviewer == "Dr A" and again.note == "small left effusion" and again.key_kind == "study_series_sop"
    assert ReviewStore(tmp_path / "rev").latest(UID) is None  # the SOP UID alone is not a key
    assert again.findings["Effusion"].probability == pytest.approx(0.81)
    assert again.findings["Mass"].threshold == pytest.approx(0.4)


def test_database_is_wal_and_latest_review_wins(tmp_path):
    store = ReviewStore(tmp_path)
    key = ImageKey.from_bytes(b"png bytes")
    assert key.kind == "sha256" and len(key.value) == 64
    store.save(key, {"Mass": "unsure"}, reviewer="A")
    store.save(key, {"Mass": "agree"}, reviewer="B")
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.latest(key.value).verdicts == {"Mass": "agree"}
    assert [r.reviewer for r in store.history(key.value)] == ["A", "B"]
    latest = store.latest_by_image()
    assert set(latest) == {key.value} and latest[key.value].reviewer == "B"
    assert store.latest("not-there") is None


@pytest.mark.parametrize(
    "verdicts, reviewer, msg",
    [
        ({"Mass": "agree"}, "  ", "reviewer"),
        ({"Mass": "maybe"}, "A", "unknown verdict"),
        ({"Mass": ""}, "A", "at least one finding"),
    ],
)
def test_invalid_reviews_are_refused_with_a_clear_error(tmp_path, verdicts, reviewer, msg):
    store = ReviewStore(tmp_path)
    with pytest.raises(ReviewError, match=msg) as info:
        store.save(KEY, verdicts, reviewer=reviewer)
    assert isinstance(info.value, DataError) and isinstance(info.value, MedxrayError)
    assert store.count() == 0


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    """One transaction per save: a failure half way (after the review row) rolls back the whole save."""
    store = ReviewStore(tmp_path)
    store.save(KEY, {"Mass": "agree"}, reviewer="A")

    real_connect = store._connect

    class Boom(sqlite3.Connection):
        def executemany(self, *a, **k):  # the per-finding insert fails
            raise sqlite3.OperationalError("disk I/O error")

    def connect():
        conn = sqlite3.connect(store.path, factory=Boom, isolation_level=None)
        return conn

    monkeypatch.setattr(store, "_connect", connect)
    with pytest.raises(sqlite3.OperationalError):
        store.save(KEY, {"Mass": "disagree"}, reviewer="B")
    monkeypatch.setattr(store, "_connect", real_connect)
    assert store.count() == 1
    assert store.latest(KEY.value).verdicts == {"Mass": "agree"}


def test_concurrent_saves_from_threads_all_land(tmp_path):
    store = ReviewStore(tmp_path)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(5):
                store.save(
                    ImageKey.from_bytes(f"{i}-{j}".encode()), {"Mass": "agree", "Edema": "unsure"}, reviewer=f"r{i}"
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert store.count() == 20
    assert len(list(store.iter_export_rows())) == 40


def test_export_csv_has_every_review_and_neutralises_formulas(tmp_path):
    store = ReviewStore(tmp_path)
    store.save(
        KEY,
        {"Mass": "agree", "Edema": "disagree"},
        reviewer="=cmd|' /C calc'!A0",
        note="+SUM(1)\nsecond line, with comma",
        probabilities={"Mass": 0.7},
    )
    store.save(ImageKey.from_bytes(b"x"), {"Hernia": "unsure"}, reviewer="B")
    out = tmp_path / "export" / "reviews.csv"
    text = store.export_csv(out)
    assert out.read_text() == text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(rows[0].keys()) == EXPORT_COLUMNS
    assert [(r["finding"], r["verdict"]) for r in rows] == [
        ("Mass", "agree"),
        ("Edema", "disagree"),
        ("Hernia", "unsure"),
    ]
    assert rows[0]["reviewer"].startswith("'=") and rows[0]["note"] == "'+SUM(1)\nsecond line, with comma"
    assert rows[0]["probability"] == "0.700000" and rows[1]["probability"] == ""
    assert rows[2]["key_kind"] == "sha256"


def test_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ReviewError, match="--reviews"):
        ReviewStore(blocker / "sub")


def test_export_carries_the_file_name_never_a_folder(tmp_path):
    store = ReviewStore(tmp_path)
    store.save(
        ImageKey.from_bytes(b"png bytes"),
        {"Mass": "agree"},
        reviewer="Dr A",
        file_name="/ward 7/Smith/00000013_005.png",
    )
    rows = list(csv.DictReader(io.StringIO(store.export_csv())))
    assert rows[0]["file_name"] == "00000013_005.png" and rows[0]["key_kind"] == "sha256"
    assert "Smith" not in store.export_csv() and "ward" not in store.export_csv()


def test_history_is_append_only_and_says_who_changed_what(tmp_path):
    store = ReviewStore(tmp_path)
    key = ImageKey.from_uids("1.1", "1.2", "1.2.3")
    store.save(key, {"Mass": "agree", "Effusion": "unsure"}, reviewer="Dr A", file_name="a.dcm")
    store.save(
        key,
        {"Mass": "disagree", "Effusion": "unsure"},
        reviewer="Dr B",
        note="second look",
        file_name="a.dcm",
        identity_source="proxy header",
    )
    store.save(key, {"Mass": "disagree", "Effusion": "unsure"}, reviewer="Dr B", note="second look")
    hist = list(store.iter_history_rows(key.value))
    assert [(h["change"], h["finding"], h["previous"], h["new"], h["reviewer"]) for h in hist] == [
        ("first review", "Mass", "", "agree", "Dr A"),
        ("first review", "Effusion", "", "unsure", "Dr A"),
        ("verdict", "Mass", "agree", "disagree", "Dr B"),
        ("note", "", "", "second look", "Dr B"),
        ("unchanged", "", "", "", "Dr B"),
    ]
    assert hist[2]["identity_source"] == "proxy header"
    exported = list(csv.DictReader(io.StringIO(store.export_csv(history=True))))
    assert len(exported) == 5 and exported[2]["previous"] == "agree" and exported[2]["file_name"] == "a.dcm"
    # the database itself refuses to rewrite or delete history
    with closing(sqlite3.connect(store.path)) as conn:
        for sql in (
            "UPDATE reviews SET reviewer = 'x'",
            "DELETE FROM reviews",
            "DELETE FROM review_findings",
            "UPDATE review_findings SET verdict = 'agree'",
        ):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                conn.execute(sql)
    assert store.count() == 3


def test_a_version_1_database_gains_the_new_columns_and_keeps_its_reviews(tmp_path):
    with closing(sqlite3.connect(tmp_path / "reviews.sqlite3")) as conn:
        conn.executescript("""
            CREATE TABLE reviews (id INTEGER PRIMARY KEY AUTOINCREMENT, image_key TEXT NOT NULL,
                key_kind TEXT NOT NULL, reviewer TEXT NOT NULL, note TEXT NOT NULL DEFAULT '',
                model_version TEXT NOT NULL DEFAULT '', saved_at_utc TEXT NOT NULL);
            CREATE TABLE review_findings (review_id INTEGER NOT NULL, finding TEXT NOT NULL, verdict TEXT NOT NULL,
                probability REAL, threshold REAL, PRIMARY KEY (review_id, finding));
            INSERT INTO reviews VALUES
                (1, '1.2.3', 'sop_instance_uid', 'Dr Old', '', 'v0', '2024-01-01T00:00:00+00:00');
            INSERT INTO review_findings VALUES (1, 'Mass', 'agree', 0.7, 0.5);
            PRAGMA user_version=1;""")
    store = ReviewStore(tmp_path)
    old = store.latest("1.2.3")
    assert old.reviewer == "Dr Old" and old.verdicts == {"Mass": "agree"} and old.file_name == ""
    assert store.adopt_legacy(["1.1/1.2/1.2.3"]) == 1  # version-1/2 keys: the SOP UID alone, adopted
    store.save(ImageKey.from_uids("1.1", "1.2", "1.2.3"), {"Mass": "disagree"}, reviewer="Dr New", file_name="x.dcm")
    assert store.latest("1.1/1.2/1.2.3").file_name == "x.dcm" and store.count() == 2
    assert [r.reviewer for r in store.history("1.1/1.2/1.2.3")] == ["Dr Old", "Dr New"]
