"""What the review app was started with, and how it is started.

Holds :class:`AppSettings` (the ``MEDXRAY_*`` environment variables that carry ``medxray app``'s
flags into the Streamlit process), the default review folder, the fail-fast settings check, the
``streamlit run`` command line, the app's standing texts (not for clinical use, how to get a
checkpoint) and the one-line error summary every page shows.

Must not import streamlit (only :mod:`medxray.review.ui` does), torch or the other app modules
(study, worklist, model_card): ``medxray app`` imports this before any heavy library.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from medxray.errors import DataError, MedxrayError
from medxray.review.store import ReviewStore

log = logging.getLogger(__name__)

# -- settings ------------------------------------------------------------------------------------

ENV_CHECKPOINT = "MEDXRAY_CHECKPOINT"
ENV_RESULTS = "MEDXRAY_RESULTS"
ENV_REVIEWS = "MEDXRAY_REVIEWS"
ENV_MAX_UPLOAD_MB = "MEDXRAY_MAX_UPLOAD_MB"
ENV_BACKEND = "MEDXRAY_BACKEND"
APP_ENV_VARS = frozenset({ENV_CHECKPOINT, ENV_RESULTS, ENV_REVIEWS, ENV_MAX_UPLOAD_MB, ENV_BACKEND})
DEFAULT_MAX_UPLOAD_MB = 64.0
NO_CHECKPOINT_HELP = (
    "No model checkpoint is configured, so the app cannot score images. Make one with "
    "`make demo` (trains a small model on phantom data in a few minutes) or "
    "`medxray finetune --dataset chestxray14 --data-root DIR`, then start the app with "
    "`medxray app --checkpoint PATH/TO/checkpoint.pt` (or set MEDXRAY_CHECKPOINT)."
)
NOT_FOR_CLINICAL_USE = (
    "Research software: **not for clinical use**. Predictions are not a diagnosis and must not "
    "be used to make or change decisions about patient care."
)


def default_reviews_dir() -> Path:
    """Per-user data folder, so reviews never land inside a source checkout by accident."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "medxray" / "reviews"


@dataclass(frozen=True)
class AppSettings:
    """What the app was started with (``medxray app`` passes these as environment variables)."""

    checkpoint: Path | None = None
    results: Path | None = None
    reviews: Path = field(default_factory=default_reviews_dir)
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    backend: str = "auto"  # Predictor backend: auto | torch | openvino

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "AppSettings":
        env = os.environ if env is None else env

        def path(name: str) -> Path | None:
            v = (env.get(name) or "").strip()
            return Path(v).expanduser() if v else None

        limit = DEFAULT_MAX_UPLOAD_MB
        raw = (env.get(ENV_MAX_UPLOAD_MB) or "").strip()
        if raw:
            try:
                limit = float(raw)
            except ValueError:
                log.warning("%s=%r is not a number; using %s MB", ENV_MAX_UPLOAD_MB, raw, DEFAULT_MAX_UPLOAD_MB)
            if not limit > 0:
                limit = DEFAULT_MAX_UPLOAD_MB
        return cls(checkpoint=path(ENV_CHECKPOINT), results=path(ENV_RESULTS),
                   reviews=path(ENV_REVIEWS) or default_reviews_dir(), max_upload_mb=limit,
                   backend=(env.get(ENV_BACKEND) or "auto").strip() or "auto")

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in the Streamlit process."""
        env = {ENV_REVIEWS: str(self.reviews), ENV_MAX_UPLOAD_MB: f"{self.max_upload_mb:g}",
               ENV_BACKEND: self.backend}
        if self.checkpoint is not None:
            env[ENV_CHECKPOINT] = str(self.checkpoint)
        if self.results is not None:
            env[ENV_RESULTS] = str(self.results)
        return env


def user_message(exc: BaseException) -> str:
    """One line for the page: our own errors say what to do; anything else is summarised, not dumped."""
    if isinstance(exc, MedxrayError):
        return str(exc)
    return (f"Unexpected error ({type(exc).__name__}): {str(exc).splitlines()[0][:200] if str(exc) else ''} "
            "- the details are in the app's log.")


def file_fingerprint(path: str | os.PathLike) -> str:
    """Identity of a file's current version (path, size, mtime) for cache keys."""
    p = Path(path)
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


# -- launching -----------------------------------------------------------------------------------

def app_entry_path() -> Path:
    """``app/medxray_app.py`` next to the package (source checkout / editable install)."""
    entry = Path(__file__).resolve().parents[2] / "app" / "medxray_app.py"
    if not entry.is_file():
        from medxray.errors import ConfigError

        raise ConfigError(f"the app's entry file {entry} is missing; run `medxray app` from a medxray source "
                          "checkout (pip install -e .)")
    return entry


def streamlit_command(cfg: AppSettings, *, host: str = "127.0.0.1", port: int = 8501, open_browser: bool = False,
                      python: str | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment for ``streamlit run`` of the app with these settings.

    Settings travel as environment variables (read by :meth:`AppSettings.from_env` in every
    page); Streamlit's own upload cap is raised above ours so our clearer message is the one
    a user sees. Usage statistics are off: the app must make no outside connections.
    """
    import sys

    argv = [python or sys.executable, "-m", "streamlit", "run", str(app_entry_path()),
            "--server.address", host, "--server.port", str(int(port)),
            "--server.headless", "false" if open_browser else "true",
            "--server.maxUploadSize", str(int(math.ceil(cfg.max_upload_mb)) + 1),
            "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none",
            "--client.toolbarMode", "minimal",
            "--global.showWarningOnDirectExecution", "false"]
    return argv, cfg.to_env()


def check_app_settings(cfg: AppSettings) -> None:
    """Fail fast, before starting a server, on settings that cannot work."""
    from medxray.errors import CheckpointError

    if cfg.checkpoint is not None and not cfg.checkpoint.is_file():
        raise CheckpointError(f"checkpoint {cfg.checkpoint} does not exist; train one with `make demo` or "
                              "`medxray finetune`, or leave out --checkpoint to browse results only")
    if cfg.results is not None and not cfg.results.is_dir():
        raise DataError(f"results folder {cfg.results} does not exist; write one with "
                        f"`medxray score-dicom INPUT --checkpoint C --out {cfg.results}`")
    ReviewStore(cfg.reviews)  # creates the folder and database, or says why it cannot
