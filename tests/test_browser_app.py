"""End to end in a real browser: `medxray app` + Debian's headless Chromium via Playwright (issue 12).

A reviewer's session over a results folder of 13 files (4 real RG1 DICOM copies, 8 real NIH
ChestX-ray14 PNGs, one file that failed to score): the keyboard-only flow (N, A/D/U, Down,
Ctrl+Enter, J/K), the state bugs 1-3, the safe defaults (every request stays on 127.0.0.1; the
plain `streamlit run` listens on loopback only) and the results-folder allow-list. Screenshots go
to test-artifacts/ (or $MEDXRAY_TEST_ARTIFACTS); timings are printed and written to
test-artifacts/browser_timings.json.

Needs /usr/bin/chromium (`apt-get install -y chromium`; `make test` installs it). Never downloads a browser.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from app_helpers import (
    APP_ENTRY,
    PHANTOM_PROVENANCE,
    make_checkpoint,
    make_results,
    make_review_folder,
    nih_pngs,
    rg1_path,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("MEDXRAY_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
SERVER_START_S = 120
UI_TIMEOUT_MS = int(
    os.environ.get("MEDXRAY_UI_TIMEOUT_MS", 120_000)
)  # first prediction loads the model on 2 shared CPU cores

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]
TIMINGS: dict[str, object] = {}
N_FULL_REVIEWS = 2  # studies reviewed finding by finding; the walk covers every study of the folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"streamlit did not become healthy in {SERVER_START_S}s:\n{log.read_text()[-3000:]}")


def _start(argv: list[str], root: Path, log: Path, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDXRAY_", "STREAMLIT_"))}
    with open(log, "wb") as fh:
        # Own process group, so teardown stops the server and anything it started, and nothing else.
        return subprocess.Popen(
            argv, env={**env, "HOME": str(root)}, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """`medxray app` (the real CLI) with a phantom-trained checkpoint and a results root of real images."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (make test does)")
    root = tmp_path_factory.mktemp("browser")
    ckpt = make_checkpoint(root / "model.pt", provenance=PHANTOM_PROVENANCE)
    results = root / "results"
    day, rows = make_review_folder(results / "day", n_dicom=4, n_png=8)
    make_results(results / "night1")
    (root / "private").mkdir()
    port = _free_port()
    argv = [
        sys.executable,
        "-m",
        "medxray.cli",
        "app",
        "--checkpoint",
        str(ckpt),
        "--results",
        str(results),
        "--reviews",
        str(root / "reviews"),
        "--max-upload-mb",
        "32",
        "--port",
        str(port),
    ]
    log = root / "server.log"
    proc = _start(argv, root, log, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield {"url": url, "root": root, "results": results, "day": day, "rows": rows, "log": log}
    finally:
        _stop_group(proc)


@pytest.fixture
def page():
    """A Chromium page that records every request; any request to another host is aborted and fails the test."""
    from playwright.sync_api import sync_playwright

    outside: list[str] = []

    def guard(route) -> None:
        host = urlparse(route.request.url).hostname
        if route.request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            context = browser.new_context(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
            context.route("**/*", guard)
            pg = context.new_page()
            pg.set_default_timeout(UI_TIMEOUT_MS)
            yield pg
        finally:
            browser.close()
    assert outside == [], f"requests left 127.0.0.1: {outside}"  # issue 12 item 6


def _no_exception_on_page(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0
    assert "Traceback" not in page.inner_text("body")


def _shot(page, name: str, height: int = 2600) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1500, "height": height})
    page.wait_for_timeout(400)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    page.set_viewport_size({"width": 1500, "height": 1100})


def _cam_caption(page) -> str:
    cap = page.get_by_text(re.compile(r"^CAM: .+ \(p = 0\.\d{3}, threshold"))
    cap.first.wait_for()
    return cap.first.inner_text()


IDLE_JS = (
    "() => { const app = document.querySelector('[data-testid=\"stApp\"]');"
    " return app && app.getAttribute('data-test-script-state') === 'notRunning'; }"
)


def _idle(page) -> None:
    """The script run has finished (Streamlit's own run state) and the review buttons, whose shortcuts we
    press, exist."""
    page.get_by_role("button", name=re.compile("Next finding")).wait_for()
    page.wait_for_function(IDLE_JS)


def _press(page, key: str, *, changes: str | None = None) -> None:
    """Press a key once the app is idle; with ``changes``, wait until that text has gone (the key took effect)."""
    _idle(page)
    page.keyboard.press(key)
    if changes is not None:
        page.wait_for_function("(c) => !document.body.innerText.includes(c)", arg=changes)
    _idle(page)


def _save_timings() -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "browser_timings.json").write_text(json.dumps(TIMINGS, indent=2))


def test_upload_two_images_map_follows_and_reviewer_is_remembered(app_server, page):
    from playwright.sync_api import expect

    url = app_server["url"]
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("heading", name="Study").wait_for()
    page.locator('[data-testid="stFileUploaderDropzone"]').wait_for()
    page.get_by_text("Upload an image to see the model's findings.").wait_for()
    body = page.inner_text("body")
    assert "not for clinical use" in body and "synthetic phantom images" in body  # items 4-5
    assert body.count("32MB") == 1 and "200MB" not in body and "64 MB" not in body  # one limit, stated once
    assert page.get_by_role("button", name="Deploy").count() == 0

    # upload -> first prediction
    uploader = page.locator('[data-testid="stFileUploader"] input[type="file"]')
    t0 = time.monotonic()
    uploader.set_input_files(rg1_path())
    first = _cam_caption(page)
    TIMINGS["upload_to_first_prediction_s"] = round(time.monotonic() - t0, 2)
    page.get_by_role("heading", name="Findings").wait_for()
    page.wait_for_function("""() => {
        const imgs = Array.from(document.querySelectorAll('[data-testid="stImage"] img'));
        return imgs.length >= 3 && imgs.every(i => i.complete && i.naturalWidth > 0);
    }""")
    _no_exception_on_page(page)
    # bug 1: move to another finding, then upload a second image: it opens on its own top finding
    _press(page, "ArrowDown", changes=first)
    _press(page, "ArrowDown", changes=_cam_caption(page))
    png = nih_pngs(1)[0]
    _idle(page)
    t0 = time.monotonic()
    uploader.set_input_files(str(png))
    page.get_by_text(re.compile(r"^Original \(file default rendering")).wait_for()
    _idle(page)
    caption = _cam_caption(page)
    TIMINGS["second_upload_to_prediction_s"] = round(time.monotonic() - t0, 2)
    labels = page.evaluate("""() => Array.from(document.querySelectorAll('[role="radiogroup"]'))
        .map(r => r.getAttribute('aria-label') || '')""")
    verdict_labels = [lab for lab in labels if " p = " in lab]
    top_name = verdict_labels[0].lstrip("▶ ").split(": p = ")[0]
    assert verdict_labels[0].startswith("▶ "), verdict_labels[:3]  # the current finding is the top one
    assert caption.startswith(f"CAM: {top_name} (p = "), (caption, top_name)
    control = page.get_by_role("combobox", name="Current finding (map shown)")
    assert control.input_value() == top_name, control.input_value()
    assert not any("_" in lab.split(": p = ")[0] for lab in verdict_labels)  # readable names (item 11)

    # bug 3: the reviewer's name survives a reload of the page (session cookie)
    name_box = page.get_by_role("textbox", name="Reviewer name")
    name_box.fill("Dr Browser")
    name_box.press("Enter")
    page.wait_for_function("() => document.cookie.includes('medxray_reviewer=Dr%20Browser')")
    _shot(page, "browser_study_upload.png")
    page.reload(wait_until="domcontentloaded")
    page.get_by_role("heading", name="Study").wait_for()
    uploader = page.locator('[data-testid="stFileUploader"] input[type="file"]')
    uploader.set_input_files(str(png))
    _cam_caption(page)
    # the page may still be re-rendering after the upload: wait (up to 30 s) for the remembered name
    expect(page.get_by_role("textbox", name="Reviewer name")).to_have_value("Dr Browser", timeout=30_000)
    _no_exception_on_page(page)
    _save_timings()


def test_keyboard_only_review_of_a_results_folder(app_server, page):
    url, rows = app_server["url"], app_server["rows"]
    n_ok = sum(r["status"] == "ok" for r in rows)
    assert n_ok >= 10
    page.goto(f"{url}/worklist", wait_until="domcontentloaded")
    page.get_by_role("heading", name="Worklist").wait_for()
    page.get_by_text(re.compile(r"of \d+ images shown")).wait_for()
    if not page.get_by_role("combobox", name="Results folder").input_value().endswith("/day"):
        page.get_by_role("combobox", name="Results folder").click()
        page.get_by_role("option", name=re.compile(r"\bday$")).click()
    page.get_by_text(f"{n_ok + 1} of {n_ok + 1} images shown").wait_for()
    _shot(page, "browser_worklist_before.png", 1400)
    page.get_by_role("button", name=re.compile("Review the first unreviewed study")).wait_for()
    page.wait_for_timeout(300)
    page.keyboard.press("n")  # N: the first unreviewed study
    page.get_by_role("heading", name="Study").wait_for()
    _cam_caption(page)
    page.get_by_text(re.compile(r"^Study 1 of \d+; 0 reviewed")).wait_for()
    assert "study=" in page.url
    box = page.get_by_role("textbox", name="Reviewer name")
    box.fill("Dr Keys")
    box.press("Enter")
    box.blur()
    page.wait_for_function("() => document.cookie.includes('medxray_reviewer=Dr%20Keys')")

    # Review the first studies in full (A, D, Down, U, Ctrl+Enter: saved, then the next unreviewed opens),
    # then walk the rest of the folder with J, and step back and forth with K / J.
    save_to_next: list[float] = []
    saved_names: list[str] = []
    for i in range(N_FULL_REVIEWS):
        _idle(page)
        _press(page, "a", changes=_cam_caption(page))  # agree with the top finding; the next becomes current
        _press(page, "d", changes=_cam_caption(page))  # disagree with the second
        _press(page, "ArrowDown", changes=_cam_caption(page))  # skip the third
        _press(page, "u", changes=_cam_caption(page))  # unsure about the fourth
        if i == 0:
            _shot(page, "browser_keyboard_before_save.png")
        t0 = time.monotonic()
        page.keyboard.press("Control+Enter")  # the app is idle (_press ends idle)
        flash = page.get_by_text(re.compile(r"^Review saved for "))
        flash.wait_for()
        page.get_by_text(re.compile(rf"^Study {i + 2} of {n_ok}; {i + 1} reviewed")).wait_for()
        _cam_caption(page)
        save_to_next.append(time.monotonic() - t0)
        saved_names.append(re.match(r"Review saved for (\S+) ", flash.inner_text()).group(1))
        _no_exception_on_page(page)
    TIMINGS["save_to_next_study_s"] = {
        "median": round(sorted(save_to_next)[len(save_to_next) // 2], 2),
        "max": round(max(save_to_next), 2),
        "n": len(save_to_next),
    }
    for i in range(N_FULL_REVIEWS + 1, n_ok):  # J through every remaining study
        _press(page, "j", changes=f"Study {i} of {n_ok}")
        page.get_by_text(re.compile(rf"^Study {i + 1} of {n_ok}")).wait_for()
        _cam_caption(page)
    _press(page, "k", changes=f"Study {n_ok} of {n_ok}")
    page.get_by_text(re.compile(rf"^Study {n_ok - 1} of {n_ok}")).wait_for()
    _press(page, "j", changes=f"Study {n_ok - 1} of {n_ok}")
    page.get_by_text(re.compile(rf"^Study {n_ok} of {n_ok}; {N_FULL_REVIEWS} reviewed")).wait_for()
    _shot(page, "browser_keyboard_after.png")
    # the study's URL opens that study in a new page
    link = page.url
    other = page.context.new_page()
    other.goto(link, wait_until="domcontentloaded")
    other.get_by_text(re.compile(rf"^Study {n_ok} of {n_ok}")).wait_for()
    other.close()
    # the exports: a file name beside every key; the history says who changed what
    with page.expect_download(timeout=60_000) as dl:
        page.get_by_role("button", name="Export reviews (CSV)").first.click()
    exported = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text())))
    assert {r["file_name"] for r in exported} == set(saved_names)
    assert set(saved_names) <= {Path(r["path"]).name for r in rows if r["status"] == "ok"}
    assert {r["verdict"] for r in exported} == {"agree", "disagree", "unsure"}
    assert {r["reviewer"] for r in exported} == {"Dr Keys"}
    with page.expect_download(timeout=60_000) as dl:
        page.get_by_role("button", name="Export review history (CSV)").first.click()
    history = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text())))
    assert len(history) == 3 * N_FULL_REVIEWS and {h["change"] for h in history} == {"first review"}
    text = Path(dl.value.path()).read_text()
    assert "CompressedSamples" not in text and "CompressedSamples" not in app_server["log"].read_text()
    # the worklist now shows every study reviewed
    page.goto(f"{url}/worklist", wait_until="domcontentloaded")
    page.get_by_text(re.compile(rf"{N_FULL_REVIEWS} reviewed")).wait_for()
    _save_timings()


def test_worklist_folder_change_resets_filters_and_outside_folders_are_refused(app_server, page):
    url, root = app_server["url"], app_server["root"]
    page.goto(f"{url}/worklist", wait_until="domcontentloaded")
    page.get_by_role("heading", name="Worklist").wait_for()
    folder = page.locator('[data-testid="stSelectbox"]').filter(has_text="Results folder")
    folder.click()
    page.get_by_role("option", name=re.compile(r"\bday$")).click()
    page.get_by_text("13 of 13 images shown").wait_for()
    status = page.locator('[data-testid="stMultiSelect"]').filter(has_text="Status")
    # remove the "ok" chip: only the failed file is left, and the chips say so
    status.get_by_role("button", name=re.compile("Remove ok", re.I)).first.click()
    page.get_by_text("1 of 13 images shown").wait_for()
    # (the table is drawn on a canvas; the reason sentence is checked in tests/test_app_review_flow.py)
    folder.click()
    page.get_by_role("option", name=re.compile(r"night1.out$")).click()
    page.get_by_text("3 of 3 images shown").wait_for()  # bug 2: the new folder's values, all chosen
    page.wait_for_function(IDLE_JS)
    page.wait_for_function("() => document.querySelectorAll('[data-testid=\"stMultiSelect\"]').length === 1")
    chips = status.inner_text()
    assert "ok" in chips and "error" in chips, chips
    _shot(page, "browser_worklist_folder_change.png", 1400)
    typed = page.get_by_role("textbox", name="Or type a folder inside them")
    typed.fill(str(root / "private"))
    typed.press("Enter")
    page.get_by_text(re.compile("is outside the results folders this app may open")).wait_for()
    typed.fill(str(app_server["results"] / "nope"))
    typed.press("Enter")
    page.get_by_text(re.compile("does not exist")).wait_for()
    _shot(page, "browser_worklist_refused.png", 1200)
    _no_exception_on_page(page)


def test_model_card_shows_provenance(app_server, page):
    page.goto(f"{app_server['url']}/model_card", wait_until="domcontentloaded")
    page.get_by_role("heading", name="Limitations").wait_for()
    page.wait_for_function(IDLE_JS)
    page.wait_for_timeout(1500)  # the tables are drawn on canvases after the run ends
    body = page.inner_text("body")
    assert "Trained and evaluated on synthetic phantom images" in body and "not for clinical use" in body
    _shot(page, "browser_model_card.png", 3000)
    _no_exception_on_page(page)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            addr, state = parts[1], parts[3]
            if state == "0A" and int(addr.rsplit(":", 1)[1], 16) == port:
                found.add(addr.rsplit(":", 1)[0])
    return found


def test_plain_streamlit_run_from_another_folder_listens_on_loopback_only(tmp_path):
    """`streamlit run app/medxray_app.py` with no flags but the port picks up app/.streamlit/config.toml."""
    port = _free_port()
    log = tmp_path / "plain.log"
    proc = _start(
        [sys.executable, "-m", "streamlit", "run", str(APP_ENTRY), "--server.port", str(port)],
        tmp_path,
        log,
        cwd=tmp_path,
    )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        assert _listening_addresses(port) == {"0100007F"}, _listening_addresses(port)  # 127.0.0.1 only
        text = log.read_text()
        assert "Network URL" not in text and "External URL" not in text, text
    finally:
        _stop_group(proc)
