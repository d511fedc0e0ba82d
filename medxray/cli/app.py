"""`medxray app`: start the clinician-review web app (Streamlit) with checked settings."""

from __future__ import annotations

import argparse
from pathlib import Path

from medxray.cli.common import BACKEND_CHOICES, add_table_option


def add_app(sub: argparse._SubParsersAction) -> None:
    """Register `medxray app`."""
    p = sub.add_parser("app", help="start the clinician-review web app (Streamlit) on this machine")
    p.add_argument("--checkpoint", type=Path, default=None, help="model checkpoint (from `medxray finetune`)")
    p.add_argument(
        "--results",
        type=Path,
        action="append",
        default=None,
        help="a folder of `medxray score-dicom --out` results (or a folder above several) that reviewers "
        "may open; repeat for several. Folders outside these are refused",
    )
    p.add_argument(
        "--reviews",
        type=Path,
        default=None,
        help="folder of the review database (default: ~/.local/share/medxray/reviews)",
    )
    p.add_argument("--max-upload-mb", type=int, default=64, help="largest accepted upload in whole MB (default 64)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    p.add_argument("--browser", action="store_true", help="open a web browser on the app")
    add_table_option(
        p,
        "--backend",
        table=BACKEND_CHOICES,
        default="auto",
        help="inference backend (default auto: OpenVINO on CPU, torch on CUDA)",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument(
        "--identity-header",
        default="",
        metavar="HEADER",
        help="take the reviewer's name from this request header (e.g. X-Forwarded-User); only behind "
        "a reverse proxy that overwrites it; needs --proxy-secret-file",
    )
    who.add_argument(
        "--login",
        action="store_true",
        help="reviewers sign in with Streamlit's st.login (OIDC, configured in .streamlit/secrets.toml)",
    )
    p.add_argument(
        "--proxy-secret-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --identity-header: file (chmod 600) holding the secret the proxy sends in the "
        "X-Medxray-Proxy-Secret header; requests without it are refused",
    )
    p.set_defaults(func=_run_app)


def _run_app(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from medxray.review.settings import (
        APP_ENV_VARS,
        AppSettings,
        check_app_settings,
        default_reviews_dir,
        streamlit_command,
    )

    cfg = AppSettings(
        checkpoint=args.checkpoint,
        results=tuple(args.results or ()),
        reviews=args.reviews or default_reviews_dir(),
        max_upload_mb=args.max_upload_mb,
        backend=args.backend,
        identity_header=args.identity_header,
        login=args.login,
        proxy_secret_file=args.proxy_secret_file,
    )
    check_app_settings(cfg)
    argv, env = streamlit_command(cfg, host=args.host, port=args.port, open_browser=args.browser)
    print(f"medxray app: http://{args.host}:{args.port}  (reviews in {cfg.reviews}; Ctrl-C stops)", flush=True)
    # The flags decide: stale MEDXRAY_* app variables of the calling shell do not leak in.
    full_env = {**{k: v for k, v in os.environ.items() if k not in APP_ENV_VARS}, **env}
    if os.name == "posix":  # become the server: signals (Ctrl-C, systemd's SIGTERM) reach it directly
        os.execve(argv[0], argv, full_env)
    return subprocess.call(argv, env=full_env)
