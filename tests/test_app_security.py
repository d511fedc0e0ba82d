"""The review app trusts nothing it reads (issue 19, items 6-8).

- Paths from a results file stay under their roots (``..``, an absolute path elsewhere, a symbolic
  link pointing out, a FIFO are refused with a plain-text message; nothing is read; the rest of the
  study list keeps working).
- Text from a file is shown as text: :func:`medxray.review.safe.md_escape` checked against a
  CommonMark renderer here, and Streamlit's own renderer in a real browser (a DICOM whose Body Part
  Examined is a Markdown image pointing at a local HTTP server: the page shows the characters and
  the server gets zero requests).
- ``--identity-header`` is believed only with the proxy's secret and only once: through a header
  injecting TCP proxy in front of the real server (a repeated header, a missing secret, a wrong
  secret are refused and nothing can be saved; the right secret and one header save the review
  under that name).

The browser tests start `medxray app` (the real CLI, no checkpoint: stored results only) on a free
loopback port and Debian's Chromium through Playwright, as tests/test_browser_app.py does.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import pytest
from app_helpers import dicom_copy

from medxray.errors import ConfigError, DataError
from medxray.labels import CHESTXRAY14_FINDINGS
from medxray.review.safe import PathRefused, contained_path, md_escape, read_contained_bytes
from medxray.review.settings import (
    IDENTITY_HEADER,
    PROXY_SECRET_HEADER,
    AppSettings,
    check_app_settings,
    read_proxy_secret,
    reviewer_identity,
)
from medxray.review.worklist import read_result_file, row_image_key, stored_cam_path

HOSTILE_TEXTS = [
    "![x](http://127.0.0.1:9/p)",
    "[click](javascript:alert(1)) and <https://example.invalid/a>",
    "see https://example.invalid/auto and www.example.invalid",
    "<img src=http://127.0.0.1:9/i onerror=alert(1)> <b>bold</b> <script>x()</script>",
    "**strong** _em_ *em* ~~gone~~ `code` \\*escaped\\*",
    "&amp; &lt;b&gt; &#60;i&#62;",
    "# heading\n- item\n> quote\n1. one\n\n| a | b |\n|---|---|\n| 1 | 2 |",
    ":red[colour] :material/warning: $x^2$ $$y$$ [^1]",
    "![ref][r]\n\n[r]: http://127.0.0.1:9/ref",
    "trailing backslash \\",
    "mail dr.x@example.invalid, WWW.EXAMPLE.INVALID, HTTPS://EXAMPLE.INVALID:443/a",
]


# -- text: one escaping function, checked against a CommonMark renderer ------------------------


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_md_escape_renders_as_the_same_characters(text):
    import html

    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    rendered = md.render(md_escape(text))
    for tag in (
        "<a ",
        "<img",
        "<em>",
        "<strong>",
        "<s>",
        "<code>",
        "<h1>",
        "<ul>",
        "<ol>",
        "<blockquote>",
        "<table>",
        "<b>",
        "<script",
    ):
        assert tag not in rendered, (text, rendered)
    # one paragraph holding exactly the characters (line breaks as spaces), HTML-escaped by the renderer
    one_line = re.sub(r"[\r\n\t]", " ", text).strip()
    inner = rendered.strip()
    assert inner.startswith("<p>") and inner.endswith("</p>") and inner.count("<p>") == 1, rendered
    shown = html.unescape(inner[3:-4])
    assert shown.replace("\u2060", "") == one_line  # the same characters (U+2060 is invisible)
    # what GFM and Streamlit transform after escapes are resolved cannot form (mdast-util-gfm-autolink-literal's
    # patterns; Streamlit's :shortcode: / :material/x: / :color[...])
    assert not re.search(r"(?i)https?://|www\.|[\w.+-]@[\w-]|:[a-z/-]+[:\[]", shown), shown


def test_md_escape_bounds_and_controls():
    assert md_escape(None) == ""
    assert md_escape("plain words 123 ÄÖ") == "plain words 123 ÄÖ"  # nothing to escape: unchanged
    assert md_escape("a\x00b\x1bc\x7fd") == "abcd"
    long = md_escape("x" * 5000)
    assert len(long) < 2100 and long.endswith("\\.\\.\\.")


# -- paths: contained under their roots -----------------------------------------------------------


def _outside_dicom(tmp_path: Path) -> Path:
    return dicom_copy(tmp_path / "private" / "secret.dcm", sop_uid="1.2.826.0.1.3680043.8.498.66601")


def test_contained_path_refuses_every_way_out(tmp_path):
    root = tmp_path / "out"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.dcm").write_bytes(b"a")
    secret = _outside_dicom(tmp_path)
    (root / "link.dcm").symlink_to(secret)
    (root / "inner.dcm").symlink_to(root / "sub" / "a.dcm")
    (root / "dirlink").symlink_to(secret.parent, target_is_directory=True)
    assert contained_path("sub/a.dcm", [root]) == (root / "sub" / "a.dcm").resolve()
    assert contained_path(str(root / "sub" / "a.dcm"), [root]) == (root / "sub" / "a.dcm").resolve()
    assert contained_path("inner.dcm", [root]) == (root / "sub" / "a.dcm").resolve()  # a link inside is fine
    assert contained_path("sub/../sub/a.dcm", [root]) == (root / "sub" / "a.dcm").resolve()
    for bad, why in (
        ("../../etc/passwd", "lies outside"),
        ("/etc/passwd", "lies outside"),
        (str(secret), "lies outside"),
        ("../private/secret.dcm", "lies outside"),
        ("link.dcm", "symbolic link"),
        ("dirlink/secret.dcm", "symbolic link"),
        ("~/x.dcm", None),
        ("", "names no"),
        ("a\x00b", "NUL"),
    ):
        if why is None:  # "~" is a folder name, not the home folder: inside, and does not exist
            assert contained_path(bad, [root]) == root.resolve() / "~" / "x.dcm"
            continue
        with pytest.raises(PathRefused, match=why):
            contained_path(bad, [root])
    with pytest.raises(PathRefused, match="refused, nothing was read"):
        read_contained_bytes("link.dcm", [root], max_bytes=10**9)


def test_read_contained_bytes_refuses_fifos_devices_and_big_files(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    os.mkfifo(root / "pipe.dcm")  # opening it for reading would block without O_NONBLOCK
    (root / "zero.dcm").symlink_to("/dev/zero")
    (root / "big.dcm").write_bytes(b"x" * 2000)
    t0 = time.monotonic()
    with pytest.raises(PathRefused, match="not a regular file"):
        read_contained_bytes("pipe.dcm", [root], max_bytes=1000)
    with pytest.raises(PathRefused, match="outside"):
        read_contained_bytes("zero.dcm", [root], max_bytes=1000)
    with pytest.raises(DataError, match="above this app's limit"):
        read_contained_bytes("big.dcm", [root], max_bytes=1000)
    assert time.monotonic() - t0 < 5
    path, data = read_contained_bytes("big.dcm", [root], max_bytes=2000)
    assert data == b"x" * 2000 and path == (root / "big.dcm").resolve()


def test_results_rows_resolve_under_input_and_out_only(tmp_path):
    inp, out = tmp_path / "input", tmp_path / "out"
    (inp / "ward").mkdir(parents=True)
    (inp / "ward" / "x.png").write_bytes(b"png")
    (out / "cams" / "x").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"input": str(inp)}))
    secret = _outside_dicom(tmp_path)
    (inp / "ward" / "out.dcm").symlink_to(secret)
    assert read_result_file(out, "ward/x.png", max_bytes=100)[1] == b"png"
    for bad in ("../private/secret.dcm", "../../../../etc/passwd", str(secret), "ward/out.dcm"):
        with pytest.raises(PathRefused):
            read_result_file(out, bad, max_bytes=10**9)
        assert row_image_key(out, {"path": bad, "sop_instance_uid": ""}) is None  # no key, nothing hashed
    # nothing was opened: Python's audit hook sees every open()/os.open() (PEP 578); none named the outside file
    opened: list[str] = []
    watching = [True]

    def hook(event, args):
        if watching[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)  # cannot be removed; ``watching`` switches it off below
    try:
        for bad in ("../private/secret.dcm", str(secret), "ward/out.dcm"):
            with pytest.raises(PathRefused):
                read_result_file(out, bad, max_bytes=10**9)
        read_result_file(out, "ward/x.png", max_bytes=100)
    finally:
        watching[0] = False
    assert not [o for o in opened if "private" in o or o.endswith("out.dcm")], opened
    assert any(o.endswith("x.png") for o in opened), opened  # the hook does see the app's opens
    assert stored_cam_path(out, {"cam_dir": "cams/x"}, "Mass") == (out / "cams" / "x" / "Mass.png").resolve()
    for cam_dir, finding in (("../../private", "secret"), ("/etc", "passwd"), ("cams/x", "../../../private/s")):
        with pytest.raises(PathRefused):
            stored_cam_path(out, {"cam_dir": cam_dir}, finding)


# -- identity: the header only with the proxy's secret, only once -------------------------------

SECRET = "0123456789abcdef0123456789abcdef"


def _who(headers, secret=SECRET):
    return reviewer_identity(AppSettings(identity_header="X-Forwarded-User"), headers=headers, proxy_secret=secret)


def test_identity_header_needs_the_secret_and_one_value():
    class Multi:  # the shape of st.context.headers: repeated headers kept, get_all returns them all
        def __init__(self, pairs):
            self.pairs = pairs

        def get_all(self, name):
            return [v for k, v in self.pairs if k.lower() == name.lower()]

    good = _who(Multi([("X-Forwarded-User", "dr.alice"), (PROXY_SECRET_HEADER, SECRET)]))
    assert (good.name, good.source, good.problem) == ("dr.alice", IDENTITY_HEADER, "")
    refused = {
        "twice": Multi(
            [("X-Forwarded-User", "mallory"), ("x-forwarded-user", "dr.alice"), (PROXY_SECRET_HEADER, SECRET)]
        ),
        "no secret": Multi([("X-Forwarded-User", "dr.alice")]),
        "wrong secret": Multi([("X-Forwarded-User", "dr.alice"), (PROXY_SECRET_HEADER, SECRET[:-1] + "0")]),
        "secret twice": Multi(
            [("X-Forwarded-User", "dr.alice"), (PROXY_SECRET_HEADER, "x"), (PROXY_SECRET_HEADER, SECRET)]
        ),
        "no name": Multi([(PROXY_SECRET_HEADER, SECRET)]),
        "blank name": Multi([("X-Forwarded-User", "  "), (PROXY_SECRET_HEADER, SECRET)]),
        "control chars": Multi([("X-Forwarded-User", "dr\x07alice"), (PROXY_SECRET_HEADER, SECRET)]),
        "too long": Multi([("X-Forwarded-User", "a" * 201), (PROXY_SECRET_HEADER, SECRET)]),
    }
    for why, headers in refused.items():
        out = _who(headers)
        assert out.name == "" and out.problem, why
    assert "appears 2 times" in _who(refused["twice"]).problem
    assert PROXY_SECRET_HEADER in _who(refused["no secret"]).problem
    # the app started without a usable secret trusts nobody
    assert _who(Multi([("X-Forwarded-User", "a"), (PROXY_SECRET_HEADER, SECRET)]), secret=None).name == ""
    # a plain mapping (lists for repeats) works too; without --identity-header the header is ignored
    assert _who({"x-forwarded-user": ["a", "b"], PROXY_SECRET_HEADER: SECRET}).name == ""
    assert reviewer_identity(AppSettings(), headers={"X-Forwarded-User": "mallory"}) is None


def test_proxy_secret_file_is_required_private_and_long_enough(tmp_path):
    f = tmp_path / "proxy.secret"
    f.write_text(SECRET + "\n")
    f.chmod(0o600)
    assert read_proxy_secret(f) == SECRET
    base = dict(reviews=tmp_path / "rev")
    with pytest.raises(ConfigError, match="needs --proxy-secret-file"):
        check_app_settings(AppSettings(identity_header="X-Forwarded-User", **base))
    with pytest.raises(ConfigError, match="only with --identity-header"):
        check_app_settings(AppSettings(proxy_secret_file=f, **base))
    check_app_settings(AppSettings(identity_header="X-Forwarded-User", proxy_secret_file=f, **base))
    with pytest.raises(ConfigError, match="carries the proxy's secret"):  # the secret is never a user name
        check_app_settings(AppSettings(identity_header=PROXY_SECRET_HEADER.lower(), proxy_secret_file=f, **base))
    f.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_proxy_secret(f)
    f.write_text("short")
    f.chmod(0o600)
    with pytest.raises(ConfigError, match="shorter than"):
        read_proxy_secret(f)
    with pytest.raises(ConfigError, match="cannot read"):
        read_proxy_secret(tmp_path / "missing")
    cfg = AppSettings(identity_header="X-Forwarded-User", proxy_secret_file=f, **base)
    assert AppSettings.from_env(cfg.to_env()) == cfg


def test_cli_refuses_identity_header_without_secret(tmp_path, capsys):
    from medxray.cli import main

    rc = main(["app", "--identity-header", "X-Forwarded-User", "--reviews", str(tmp_path / "rev"), "--port", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "needs --proxy-secret-file" in err and "Traceback" not in err


# -- the real server: paths, text, identity in a browser ----------------------------------------

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
UI_TIMEOUT_MS = int(os.environ.get("MEDXRAY_UI_TIMEOUT_MS", 120_000))
IDLE_JS = (
    "() => { const app = document.querySelector('[data-testid=\"stApp\"]');"
    " return app && app.getAttribute('data-test-script-state') === 'notRunning'; }"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


class HeaderProxy:
    """A TCP proxy in front of the app that adds header lines to the WebSocket handshake.

    ``inject`` (a list of "Name: value" lines) is added to each ``GET /_stcore/stream`` request as
    it passes (Chromium opens a new connection for each WebSocket, so that request is the first on
    its connection); everything else is piped unchanged. It plays a client that sends its own
    header and a proxy that appends (rather than overwrites) one, or a proxy with no secret.
    """

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.inject: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.handshakes: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = client.recv(65536)
                if not chunk:
                    client.close()
                    return
                head += chunk
            header, rest = head.split(b"\r\n\r\n", 1)
            if header.startswith(b"GET /_stcore/stream"):
                header += b"".join(b"\r\n" + line.encode() for line in self.inject)
                self.handshakes.append(header)
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            upstream.sendall(header + b"\r\n\r\n" + rest)
        except OSError:
            client.close()
            return

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self) -> None:
        self.sock.close()


OOD_TEXT = (
    "out of distribution: ![w](http://127.0.0.1:{hp}/w) <img src=http://127.0.0.1:{hp}/i> **b** _e_ "
    ":red[c] :smile: :material/home: www.example.invalid dr.x@example.invalid $x$"
)


def _row(path: str, probs, *, uid: str = "", status: str = "ok", reason: str = "", warnings: str = "") -> dict:
    labels = list(CHESTXRAY14_FINDINGS)
    return {
        "path": path,
        "status": status,
        "reason": reason,
        "sop_instance_uid": uid,
        "study_instance_uid": "",
        "series_instance_uid": "",
        "modality": "CR" if status == "ok" else "",
        "view_position": "PA",
        **{f"p_{n}": (float(p) if status == "ok" else "") for n, p in zip(labels, probs)},
        "positive_findings": "",
        "warnings": warnings,
        "model": "densenet121",
        "model_version": "test-random-v1",
    }


def _small_dicom(dest: Path, uid: str, body_part: str = "CHEST") -> Path:
    """RG1 (real CR) at 1/6 of its size, so each page of the browser tests decodes it quickly."""
    import pydicom

    dicom_copy(dest, sop_uid=uid)
    ds = pydicom.dcmread(dest)
    px = np.ascontiguousarray(ds.pixel_array[::6, ::6])
    ds.Rows, ds.Columns = px.shape
    ds.PixelData = px.tobytes()
    with warnings.catch_warnings():  # CS allows 16 characters; a hostile file need not care (pydicom warns)
        warnings.simplefilter("ignore", UserWarning)
        ds.BodyPartExamined = body_part
        ds.save_as(dest)
    return dest


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    """`medxray app --identity-header X-Forwarded-User --proxy-secret-file F` over a results folder whose
    rows point outside its roots and carry Markdown, a local HTTP server counting hits, and the proxy."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (make test does)")
    root = tmp_path_factory.mktemp("hostile")
    _CountingHandler.hits = []
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    hp = web.server_address[1]
    results = root / "results"
    out, inp = results / "night", results / "night" / "input"
    secret_dcm = _outside_dicom(root)  # a real DICOM outside every root: shown only if the app read it
    _small_dicom(inp / "good.dcm", "1.2.826.0.1.3680043.8.498.66610")
    _small_dicom(inp / "evil.dcm", "1.2.826.0.1.3680043.8.498.66611", body_part=f"![x](http://127.0.0.1:{hp}/p)")
    (inp / "link.dcm").symlink_to(secret_dcm)
    rng = np.random.default_rng(0)
    probs = [rng.uniform(0.05, 0.6, len(CHESTXRAY14_FINDINGS)) for _ in range(6)]
    for i, p in enumerate(probs):
        p[0] = 0.9 - 0.1 * i  # a known worklist order
    rows = [
        _row("good.dcm", probs[0], uid="1.2.826.0.1.3680043.8.498.66610"),
        _row("evil.dcm", probs[1], uid="1.2.826.0.1.3680043.8.498.66611", warnings=OOD_TEXT.format(hp=hp)),
        _row("../../../../../../etc/passwd", probs[2]),
        _row(str(secret_dcm), probs[3]),
        _row("link.dcm", probs[4]),
        _row("bad.dcm", probs[5], status="error", reason=f"not_dicom: ![r](http://127.0.0.1:{hp}/r)"),
    ]
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    (out / "run.json").write_text(json.dumps({"input": str(inp)}))
    secret_file = root / "proxy.secret"
    secret_file.write_text(SECRET)
    secret_file.chmod(stat.S_IRUSR | stat.S_IWUSR)
    port = _free_port()
    argv = [
        sys.executable,
        "-m",
        "medxray.cli",
        "app",
        "--results",
        str(results),
        "--reviews",
        str(root / "reviews"),
        "--identity-header",
        "X-Forwarded-User",
        "--proxy-secret-file",
        str(secret_file),
        "--port",
        str(port),
    ]
    log = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDXRAY_", "STREAMLIT_"))}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            argv, env={**env, "HOME": str(root)}, stdout=fh, stderr=subprocess.STDOUT, cwd=root, start_new_session=True
        )
    proxy = HeaderProxy(port)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield {
            "url": f"http://127.0.0.1:{port}",
            "proxy": proxy,
            "web_port": hp,
            "root": root,
            "out": out,
            "reviews": root / "reviews",
            "log": log,
            "hits": _CountingHandler.hits,
        }
    finally:
        proxy.close()
        web.shutdown()
        import signal

        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=20)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


def _page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1800})
    pg = ctx.new_page()
    pg.set_default_timeout(UI_TIMEOUT_MS)
    return ctx, pg


def _open_study(pg, base: str, path: str) -> None:
    pg.goto(f"{base}/?study={quote(path, safe='')}", wait_until="domcontentloaded")
    pg.get_by_role("heading", name="Study").wait_for()
    pg.get_by_text(re.compile(r"^Study \d+ of \d+")).wait_for()
    pg.wait_for_function(IDLE_JS)


@pytest.mark.browser
@pytest.mark.slow
def test_results_paths_outside_the_roots_are_refused_in_the_app(hostile_server, browser):
    ctx, pg = _page(browser)
    try:
        base = hostile_server["url"]
        for path in (
            "../../../../../../etc/passwd",
            str(hostile_server["root"] / "private" / "secret.dcm"),
            "link.dcm",
        ):
            _open_study(pg, base, path)
            alert = pg.locator('[data-testid="stAlert"]').filter(has_text="refused, nothing was read")
            alert.first.wait_for()
            text = alert.first.inner_text()
            assert "Cannot open this image" in text and path in text, text  # the path, shown as plain text
            assert pg.get_by_text(re.compile(r"^Original \(")).count() == 0  # no image drawn
            assert pg.locator('[data-testid="stException"]').count() == 0
        # the rest of the list keeps working: the next study opens normally
        _open_study(pg, base, "good.dcm")
        pg.get_by_text(re.compile(r"^Original \(")).wait_for()
        assert pg.locator('[data-testid="stAlert"]').filter(has_text="nothing was read").count() == 0
        assert "root:" not in pg.inner_text("body")
    finally:
        ctx.close()


@pytest.mark.browser
@pytest.mark.slow
def test_dicom_text_is_shown_as_text_and_fetches_nothing(hostile_server, browser):
    hp, hits = hostile_server["web_port"], hostile_server["hits"]
    assert urllib.request.urlopen(f"http://127.0.0.1:{hp}/probe", timeout=5).status == 200  # the counter counts
    assert hits == ["/probe"]
    hits.clear()
    ctx, pg = _page(browser)
    seen: list[str] = []
    pg.on("request", lambda r: seen.append(r.url))
    try:
        _open_study(pg, hostile_server["url"], "evil.dcm")
        pg.get_by_text(re.compile(r"^Original \(")).wait_for()
        body_part = f"![X](HTTP://127.0.0.1:{hp}/P)"  # the reader's text upper-cases the CS value
        warn = pg.locator('[data-testid="stAlert"]').filter(has_text="Body Part Examined")
        warn.first.wait_for()
        assert body_part in warn.first.inner_text().replace("\u2060", "")
        ood = pg.locator('[data-testid="stAlert"]').filter(has_text="out of distribution")
        ood.first.wait_for()
        assert OOD_TEXT.format(hp=hp) in ood.first.inner_text().replace("\u2060", "")  # every character, as text
        for alert in (warn.first, ood.first):  # no link, image, emphasis, code or icon made from the file's text
            found = alert.evaluate("""(el) => Array.from(el.querySelectorAll(
                ':is(img, a, strong, em, code, span[data-testid="stIconMaterial"])')).map(e => e.outerHTML)""")
            assert found == [], found
        pg.wait_for_timeout(2000)  # give any image fetch time to happen
        assert hits == [], hits
        assert not [u for u in seen if f":{hp}/" in u], seen
    finally:
        ctx.close()


def _review_panel(pg, base: str) -> None:
    _open_study(pg, base, "good.dcm")
    pg.get_by_role("heading", name="Review").wait_for()
    pg.wait_for_function(IDLE_JS)


@pytest.mark.browser
@pytest.mark.slow
def test_identity_header_is_believed_only_with_the_secret_and_once(hostile_server, browser):
    from medxray.review import ReviewStore

    proxy = hostile_server["proxy"]
    via_proxy = f"http://127.0.0.1:{proxy.port}"
    cases = {
        "header twice (client first, proxy appends)": (
            ["X-Forwarded-User: mallory", "X-Forwarded-User: dr.alice", f"{PROXY_SECRET_HEADER}: {SECRET}"],
            "appears 2 times",
        ),
        # also what a local process connecting to the app's port directly, with any header it likes, looks like
        "header without the secret": (["X-Forwarded-User: mallory"], "did not come through the trusted"),
    }
    for why, (lines, message) in cases.items():
        proxy.inject = lines
        ctx, pg = _page(browser)
        try:
            _review_panel(pg, via_proxy)
            pg.get_by_text(re.compile("Reviewer refused")).wait_for()
            assert message in pg.inner_text("body"), why
            assert pg.get_by_role("button", name="Save review").is_disabled(), why
            pg.keyboard.press("Control+Enter")  # the save shortcut does nothing either
            pg.wait_for_function(IDLE_JS)
            assert pg.get_by_text(re.compile("^Review saved")).count() == 0, why
        finally:
            ctx.close()
    assert not ReviewStore(hostile_server["reviews"]).latest_by_image()  # nothing was saved by anyone
    # the proxy overwrites the header and adds the secret: the review is saved under that name
    proxy.inject = ["X-Forwarded-User: dr.alice", f"{PROXY_SECRET_HEADER}: {SECRET}"]
    ctx, pg = _page(browser)
    try:
        _review_panel(pg, via_proxy)
        pg.get_by_text("Reviewer: dr.alice (from the proxy header)").wait_for()
        pg.get_by_role("button", name=re.compile("^Agree")).click()
        pg.get_by_role("radio", name="agree", exact=True, checked=True).first.wait_for()  # the verdict took
        pg.wait_for_function(IDLE_JS)
        pg.get_by_role("button", name="Save review").click()
        try:
            pg.get_by_text(re.compile("^Review saved for good.dcm")).wait_for(timeout=60_000)
        except Exception:
            raise AssertionError(f"no 'Review saved' message; the page says:\n{pg.inner_text('body')[:3000]}") from None
    finally:
        ctx.close()
    latest = list(ReviewStore(hostile_server["reviews"]).latest_by_image().values())
    assert [(r.reviewer, r.identity_source) for r in latest] == [("dr.alice", IDENTITY_HEADER)]
    assert SECRET not in hostile_server["log"].read_text()


# -- every page that shows file text escapes it (AppTest: the Markdown each element is given) -----


def _raw_markdown_free(values, *payloads) -> None:
    """None of the payloads reaches a Markdown element unescaped; each one does reach it escaped."""
    joined = " | ".join(str(v) for v in values)
    for p in payloads:
        assert p not in joined, (p, joined)
        assert md_escape(p) in joined, (md_escape(p), joined)


@pytest.mark.slow
def test_worklist_and_study_pages_escape_file_text_and_refuse_outside_maps(tmp_path, monkeypatch):
    from app_helpers import APP_ENTRY
    from streamlit.testing.v1 import AppTest

    from medxray.review.settings import ENV_RESULTS, ENV_REVIEWS

    out, inp = tmp_path / "results" / "night", tmp_path / "results" / "night" / "input"
    _small_dicom(inp / "good.dcm", "1.2.826.0.1.3680043.8.498.66620")
    (tmp_path / "private").mkdir()
    reason = "not_dicom: ![r](http://127.0.0.1:9/r)"
    probs = np.linspace(0.9, 0.1, len(CHESTXRAY14_FINDINGS))
    good = _row("good.dcm", probs, uid="1.2.826.0.1.3680043.8.498.66620")
    good["cam_dir"] = "../../../private"  # the stored maps' folder points outside OUT
    rows = [good, _row("bad.dcm", probs, status="error", reason=reason)]
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    (out / "run.json").write_text(json.dumps({"input": str(inp)}))
    for k in list(os.environ):
        if k.startswith("MEDXRAY_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv(ENV_RESULTS, str(tmp_path / "results"))
    monkeypatch.setenv(ENV_REVIEWS, str(tmp_path / "reviews"))
    at = AppTest.from_file(str(APP_ENTRY), default_timeout=120).run()
    at.switch_page("app_pages/worklist.py").run()
    assert not at.exception, [e.value for e in at.exception]
    key = next(d.key for d in at.dataframe if str(d.key).startswith("worklist_table_"))
    table = next(d.value for d in at.dataframe if d.key == key)
    bad = int(table.index[table["file"] == "bad.dcm"][0])
    at.session_state[key] = {"selection": {"rows": [bad], "columns": [], "cells": []}}
    at.run()
    _raw_markdown_free([w.value for w in at.warning], "![r](http://127.0.0.1:9/r)")
    # the good row opens (no model: stored results); its stored map would be outside OUT: refused, said so
    at.switch_page("app_pages/study.py")
    at.session_state["study_request"] = {"row": int(table.loc[table["file"] == "good.dcm", "row"].iloc[0])}
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    errors = " | ".join(e.value for e in at.error)
    assert "stored map is not shown" in errors and "outside" in errors, errors
    assert any(c.startswith("Original (") for im in at.image for c in im.captions)  # the image itself opened


def test_model_card_escapes_checkpoint_text():
    from medxray.review.model_card import model_card

    meta = {
        "architecture": "densenet121",
        "label_names": ["Mass"],
        "intended_use": "![i](http://127.0.0.1:9/i) **all**",
        "limitations": ["<img src=http://127.0.0.1:9/l>"],
    }
    card = model_card(meta)  # the page renders intended_use and limitations as Markdown
    _raw_markdown_free(
        [card.intended_use, *card.limitations], "![i](http://127.0.0.1:9/i) **all**", "<img src=http://127.0.0.1:9/l>"
    )
    assert any("`medxray evaluate`" in x for x in card.limitations)  # our own Markdown stays Markdown
