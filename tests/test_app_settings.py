"""App settings and launch, the reviewer's identity, results roots, and messages a user reads (no Streamlit)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from medxray.errors import CheckpointError, DataError, MedxrayError
from medxray.review.settings import (
    DEFAULT_MAX_UPLOAD_MB,
    ENV_CHECKPOINT,
    ENV_MAX_UPLOAD_MB,
    ENV_RESULTS,
    AppSettings,
    check_app_settings,
    streamlit_command,
    user_message,
)


def test_settings_roundtrip_through_environment(tmp_path):
    cfg = AppSettings(
        checkpoint=tmp_path / "c.pt",
        results=(tmp_path / "out", tmp_path / "b"),
        reviews=tmp_path / "rev",
        max_upload_mb=5,
        identity_header="X-Forwarded-User",
    )
    again = AppSettings.from_env(cfg.to_env())
    assert again == cfg and again.max_upload_bytes == 5 * 2**20 and again.results == (tmp_path / "out", tmp_path / "b")
    empty = AppSettings.from_env({ENV_MAX_UPLOAD_MB: "lots"})
    assert empty.checkpoint is None and empty.results == ()
    assert empty.max_upload_mb == DEFAULT_MAX_UPLOAD_MB
    assert AppSettings(max_upload_mb=1.2).max_upload_mb == 2  # whole MB, as the uploader states it


def test_streamlit_command_binds_localhost_and_passes_settings(tmp_path):
    cfg = AppSettings(checkpoint=tmp_path / "c.pt", reviews=tmp_path / "rev", max_upload_mb=10)
    argv, env = streamlit_command(cfg, port=8765)
    assert argv[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert argv[4].endswith("app/medxray_app.py")
    opts = dict(zip(argv[5::2], argv[6::2]))
    assert opts["--server.address"] == "127.0.0.1" and opts["--server.port"] == "8765"
    assert opts["--browser.gatherUsageStats"] == "false" and opts["--client.toolbarMode"] == "minimal"
    assert int(opts["--server.maxUploadSize"]) == 10  # one limit: the uploader states the app's own
    assert env[ENV_CHECKPOINT] == str(tmp_path / "c.pt") and ENV_RESULTS not in env


def test_check_app_settings_fails_fast_with_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="make demo"):
        check_app_settings(AppSettings(checkpoint=tmp_path / "none.pt", reviews=tmp_path / "r"))
    with pytest.raises(DataError, match="score-dicom"):
        check_app_settings(AppSettings(results=tmp_path / "nope", reviews=tmp_path / "r"))
    check_app_settings(AppSettings(reviews=tmp_path / "r"))
    assert (tmp_path / "r" / "reviews.sqlite3").is_file()


def test_cli_app_refuses_missing_checkpoint_without_traceback(tmp_path, capsys):
    from medxray.cli import main

    rc = main(["app", "--checkpoint", str(tmp_path / "missing.pt"), "--reviews", str(tmp_path / "r")])
    err = capsys.readouterr().err
    # one line naming the path and what to do (a registry folder is accepted too, so not "does not exist")
    assert rc == 2 and "missing.pt" in err and "make demo" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_evaluate_on_a_text_file_says_not_a_checkpoint(capsys):
    from medxray.cli import main

    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert main(["evaluate", "--checkpoint", str(readme)]) == 2
    err = capsys.readouterr().err
    assert "not a medxray checkpoint" in err and "weights_only" not in err and "Traceback" not in err


def test_user_message_never_dumps_a_traceback():
    assert user_message(DataError("bad file; try another")) == "bad file; try another"
    msg = user_message(RuntimeError("x\nline two"))
    assert "RuntimeError" in msg and "line two" not in msg
    assert issubclass(DataError, MedxrayError)


def test_refusal_codes_become_sentences():
    from medxray.dicom import REASON_CODES
    from medxray.review.settings import REASON_SENTENCES, reason_sentence

    assert set(REASON_SENTENCES) == set(REASON_CODES)  # one sentence per code, kept in step
    assert reason_sentence("not_dicom: no DICM marker at byte 128") == "Not a DICOM file: no DICM marker at byte 128."
    assert reason_sentence("") == ""
    from medxray.dicom import refusal

    assert user_message(refusal("truncated", "ends at byte 10")) == "The file is cut short: ends at byte 10."


def test_results_folders_only_inside_the_configured_roots(tmp_path):
    from medxray.review.settings import allowed_results_folder

    root, other = tmp_path / "results", tmp_path / "private"
    (root / "night1").mkdir(parents=True)
    other.mkdir()
    (root / "escape").symlink_to(other, target_is_directory=True)
    assert allowed_results_folder("", [root]) == root.resolve()
    assert allowed_results_folder("night1", [root]) == (root / "night1").resolve()
    assert allowed_results_folder(str(root / "night1"), [root]) == (root / "night1").resolve()
    for outside in (str(other), "/etc", str(root / ".." / "private"), str(root / "escape")):
        with pytest.raises(DataError, match="outside the results folders"):
            allowed_results_folder(outside, [root])
    with pytest.raises(DataError, match="does not exist"):
        allowed_results_folder("night2", [root])
    with pytest.raises(DataError, match="started without a results folder"):
        allowed_results_folder(str(root), [])


def test_reviewer_identity_from_the_deployment():
    from medxray.review.settings import IDENTITY_HEADER, IDENTITY_LOGIN, reviewer_identity

    assert reviewer_identity(AppSettings(), headers={"X-Forwarded-User": "mallory"}) is None  # not trusted by default
    proxy = AppSettings(identity_header="X-Forwarded-User")
    # the header is believed only with the proxy's secret (the refusals: tests/test_app_security.py)
    secret = "s" * 32
    ok = reviewer_identity(
        proxy, headers={"x-forwarded-user": " dr.a ", "X-Medxray-Proxy-Secret": secret}, proxy_secret=secret
    )
    assert (ok.name, ok.source, ok.problem) == ("dr.a", IDENTITY_HEADER, "")
    missing = reviewer_identity(proxy, headers={"X-Medxray-Proxy-Secret": secret}, proxy_secret=secret)
    assert (missing.name, missing.source) == ("", IDENTITY_HEADER) and missing.problem  # nobody, never a guess
    login = AppSettings(login=True)
    assert reviewer_identity(login, user={"is_logged_in": True, "email": "b@x.org"}).name == "b@x.org"
    out = reviewer_identity(login, user={"is_logged_in": False, "email": "b@x.org"})
    assert (out.name, out.source) == ("", IDENTITY_LOGIN)
