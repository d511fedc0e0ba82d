"""End to end in a real browser: `streamlit run` of the app + Debian's headless Chromium via Playwright.

Needs /usr/bin/chromium (`apt-get install -y chromium`; `make test` installs it). Never downloads a
browser. Leaves a screenshot in test-artifacts/ (or $MEDXRAY_TEST_ARTIFACTS).
"""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from app_helpers import make_checkpoint, rg1_path

from medxray.review.settings import AppSettings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("MEDXRAY_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
SERVER_START_S = 120
UI_TIMEOUT_MS = 180_000  # first prediction compiles the model on 2 shared CPU cores

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


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


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """`medxray app --checkpoint C --reviews R --port P` (the real CLI) on 127.0.0.1 with a tiny checkpoint."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (make test does)")
    root = tmp_path_factory.mktemp("browser")
    cfg = AppSettings(checkpoint=make_checkpoint(root / "model.pt"), reviews=root / "reviews", max_upload_mb=32)
    port = _free_port()
    argv = [sys.executable, "-m", "medxray.cli", "app", "--checkpoint", str(cfg.checkpoint),
            "--reviews", str(cfg.reviews), "--max-upload-mb", "32", "--port", str(port)]
    log = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDXRAY_")}
    with open(log, "wb") as fh:
        # Own process group, so teardown stops the server and anything it started, and nothing else.
        proc = subprocess.Popen(argv, env={**env, "HOME": str(root)}, stdout=fh, stderr=subprocess.STDOUT,
                                cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url, cfg, log
    finally:
        _stop_group(proc)


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


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            pg = context.new_page()
            pg.set_default_timeout(UI_TIMEOUT_MS)
            yield pg
        finally:
            browser.close()


def _no_exception_on_page(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0
    assert "Traceback" not in page.inner_text("body")


def test_upload_dicom_see_cam_save_review_and_export(app_server, page):
    url, cfg, log = app_server
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("heading", name="Study").wait_for()

    # 1. upload the real RG1 chest CR
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(rg1_path())

    # 2. predictions and the CAM image appear
    cam_caption = page.get_by_text(re.compile(r"^CAM: \w+ \(p = 0\.\d{3}"))
    cam_caption.wait_for()
    page.get_by_role("heading", name="Findings").wait_for()
    images = page.locator('[data-testid="stImage"] img')
    images.first.wait_for()
    # original, CAM overlay and probability chart, each really decoded (not a broken-image icon);
    # the chart is drawn after the Findings heading is sent, so wait for it rather than count now
    page.wait_for_function("""() => {
        const imgs = Array.from(document.querySelectorAll('[data-testid="stImage"] img'));
        return imgs.length >= 3 && imgs.every(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
    }""", timeout=UI_TIMEOUT_MS)
    _no_exception_on_page(page)

    # 3. record a review for the most likely finding
    groups = page.get_by_role("radiogroup").filter(has_text="disagree")
    groups.first.wait_for()
    first = groups.first
    finding = re.match(r"^(\w+): p = ", first.get_attribute("aria-label") or "")
    assert finding, first.get_attribute("aria-label")
    finding = finding.group(1)
    first.get_by_text("agree", exact=True).click()
    page.get_by_role("textbox", name="Reviewer name").fill("Dr Browser")
    page.get_by_role("textbox", name="Note").fill("checked in chromium")
    page.get_by_role("button", name="Save review").click()
    page.get_by_text(re.compile(r"Review saved")).wait_for()
    _no_exception_on_page(page)

    # Streamlit scrolls inside its own container: a tall viewport puts the whole page in the shot.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1400, "height": 3400})
    page.get_by_role("heading", name="Study").scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "browser_study.png"), full_page=True)

    # 4. the export (a real download) contains it
    with page.expect_download(timeout=60_000) as dl:
        page.get_by_role("button", name="Export reviews (CSV)").first.click()
    text = Path(dl.value.path()).read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["finding"], r["verdict"], r["reviewer"], r["note"]) for r in rows] == [
        (finding, "agree", "Dr Browser", "checked in chromium")]
    assert rows[0]["key_kind"] == "sop_instance_uid" and rows[0]["image_key"].startswith("1.3.6.1.4.1.5962")
    # nothing identifying the patient (RG1's patient name) reaches the export or the server log
    assert "CompressedSamples" not in text and "CompressedSamples" not in log.read_text()


def test_bad_upload_shows_message_and_app_keeps_working(app_server, page, tmp_path):
    url, _, _ = app_server
    bad = tmp_path / "not_an_image.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\x01\x02" * 200)
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("heading", name="Study").wait_for()
    uploader = page.locator('[data-testid="stFileUploader"] input[type="file"]')
    uploader.set_input_files(str(bad))
    page.get_by_text(re.compile("Cannot open this image")).wait_for()
    _no_exception_on_page(page)
    page.get_by_role("link", name="Model card").click()
    page.get_by_text(re.compile("not for clinical use")).first.wait_for()
    page.get_by_role("heading", name="Metrics").wait_for()
    _no_exception_on_page(page)
