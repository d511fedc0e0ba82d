"""What the review app was started with, and how it is started.

Holds :class:`AppSettings` (the ``MEDXRAY_*`` environment variables that carry ``medxray app``'s
flags into the Streamlit process), the default review folder, the results-folder allow-list
(:func:`allowed_results_folder`: a browser user may open only folders inside the roots the app
was started with), the reviewer identity a deployment vouches for (:func:`reviewer_identity`: a
proxy header believed only with the proxy's shared secret and only once; st.login), the
fail-fast settings check, the ``streamlit run`` command line, the app's
standing texts (not for clinical use, how to get a checkpoint) and the one-line error summary
every page shows.

Must not import streamlit (only :mod:`medxray.review.ui` does), torch or the other app modules
(study, worklist, model_card): ``medxray app`` imports this before any heavy library.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from medxray.errors import ConfigError, DataError, MedxrayError
from medxray.review.store import ReviewStore

log = logging.getLogger(__name__)

# -- settings ------------------------------------------------------------------------------------

ENV_CHECKPOINT = "MEDXRAY_CHECKPOINT"
ENV_RESULTS = "MEDXRAY_RESULTS"
ENV_REVIEWS = "MEDXRAY_REVIEWS"
ENV_MAX_UPLOAD_MB = "MEDXRAY_MAX_UPLOAD_MB"
ENV_BACKEND = "MEDXRAY_BACKEND"
ENV_IDENTITY_HEADER = "MEDXRAY_IDENTITY_HEADER"  # trusted reverse-proxy header naming the signed-in user
ENV_PROXY_SECRET_FILE = "MEDXRAY_PROXY_SECRET_FILE"  # file holding the secret the proxy adds to every request
ENV_LOGIN = "MEDXRAY_LOGIN"  # "1": reviewers sign in with st.login (OIDC configured in secrets.toml)
APP_ENV_VARS = frozenset(
    {
        ENV_CHECKPOINT,
        ENV_RESULTS,
        ENV_REVIEWS,
        ENV_MAX_UPLOAD_MB,
        ENV_BACKEND,
        ENV_IDENTITY_HEADER,
        ENV_PROXY_SECRET_FILE,
        ENV_LOGIN,
    }
)
# The header the trusted reverse proxy adds (overwriting any a client sent) with the shared secret of
# --proxy-secret-file; the identity header is believed only on a request that carries it exactly once.
PROXY_SECRET_HEADER = "X-Medxray-Proxy-Secret"
MIN_PROXY_SECRET_CHARS = 16
DEFAULT_MAX_UPLOAD_MB = 64
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
NOT_FOR_CLINICAL_USE_SHORT = "Research software, not for clinical use: predictions are not a diagnosis."


def default_reviews_dir() -> Path:
    """Per-user data folder, so reviews never land inside a source checkout by accident."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "medxray" / "reviews"


@dataclass(frozen=True)
class AppSettings:
    """What the app was started with (``medxray app`` passes these as environment variables)."""

    checkpoint: Path | None = None
    results: tuple[Path, ...] = ()  # roots a reviewer may open results folders in (the first is opened)
    reviews: Path = field(default_factory=default_reviews_dir)
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB  # whole MB: Streamlit's uploader states it in whole MB
    backend: str = "auto"  # Predictor backend: auto | torch | openvino
    identity_header: str = ""  # e.g. X-Forwarded-User, set only behind a proxy that overwrites it
    proxy_secret_file: Path | None = None  # the secret the proxy sends in PROXY_SECRET_HEADER (needed with the above)
    login: bool = False  # st.login (OIDC) decides who the reviewer is

    def __post_init__(self) -> None:
        roots = self.results
        if roots is None:
            roots = ()
        elif isinstance(roots, (str, os.PathLike)):
            roots = (roots,)
        object.__setattr__(self, "results", tuple(Path(r).expanduser() for r in roots))
        object.__setattr__(self, "max_upload_mb", max(1, int(math.ceil(float(self.max_upload_mb)))))

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "AppSettings":
        env = os.environ if env is None else env

        def path(name: str) -> Path | None:
            v = (env.get(name) or "").strip()
            return Path(v).expanduser() if v else None

        limit: float = DEFAULT_MAX_UPLOAD_MB
        raw = (env.get(ENV_MAX_UPLOAD_MB) or "").strip()
        if raw:
            try:
                limit = float(raw)
            except ValueError:
                log.warning("%s=%r is not a number; using %s MB", ENV_MAX_UPLOAD_MB, raw, DEFAULT_MAX_UPLOAD_MB)
            if not (limit > 0 and math.isfinite(limit)):
                limit = DEFAULT_MAX_UPLOAD_MB
        roots = tuple(Path(v.strip()).expanduser() for v in (env.get(ENV_RESULTS) or "").split(os.pathsep) if v.strip())
        return cls(
            checkpoint=path(ENV_CHECKPOINT),
            results=roots,
            reviews=path(ENV_REVIEWS) or default_reviews_dir(),
            max_upload_mb=int(math.ceil(limit)),
            backend=(env.get(ENV_BACKEND) or "auto").strip() or "auto",
            identity_header=(env.get(ENV_IDENTITY_HEADER) or "").strip(),
            proxy_secret_file=path(ENV_PROXY_SECRET_FILE),
            login=(env.get(ENV_LOGIN) or "").strip().lower() in ("1", "true", "yes"),
        )

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in the Streamlit process."""
        env = {ENV_REVIEWS: str(self.reviews), ENV_MAX_UPLOAD_MB: str(self.max_upload_mb), ENV_BACKEND: self.backend}
        if self.checkpoint is not None:
            env[ENV_CHECKPOINT] = str(self.checkpoint)
        if self.results:
            env[ENV_RESULTS] = os.pathsep.join(str(r) for r in self.results)
        if self.identity_header:
            env[ENV_IDENTITY_HEADER] = self.identity_header
        if self.proxy_secret_file is not None:
            env[ENV_PROXY_SECRET_FILE] = str(self.proxy_secret_file)
        if self.login:
            env[ENV_LOGIN] = "1"
        return env


def allowed_results_folder(typed: str | os.PathLike, roots: tuple[Path, ...] | list[Path]) -> Path:
    """The results folder a reviewer asked for, if it lies inside one of the configured roots.

    ``typed`` is absolute, or relative to the first root. Symbolic links and ``..`` are resolved
    before the check, so neither leads outside. Raises :class:`DataError` with a sentence for a
    reviewer: no roots configured, a folder outside them, or one that does not exist.
    """
    text = str(typed).strip()
    if not roots:
        raise DataError(
            "this app was started without a results folder, so none can be opened; restart it with "
            "`medxray app --results FOLDER` (repeat --results for several)"
        )
    p = Path(text).expanduser() if text else roots[0]
    if not p.is_absolute():
        p = roots[0] / p
    real = Path(os.path.realpath(p))
    for root in roots:
        r = Path(os.path.realpath(root))
        if real == r or r in real.parents:
            if not real.exists():
                raise DataError(f"{p} does not exist; check the folder name")
            if not real.is_dir():
                raise DataError(f"{p} is a file, not a folder; choose the folder that holds results.csv")
            return real
    allowed = ", ".join(str(r) for r in roots)
    raise DataError(
        f"{p} is outside the results folders this app may open ({allowed}); choose a folder inside "
        "them, or restart the app with another --results FOLDER"
    )


IDENTITY_TYPED, IDENTITY_HEADER, IDENTITY_LOGIN = "typed", "proxy header", "sign-in"
MAX_REVIEWER_NAME_CHARS = 200


@dataclass(frozen=True)
class DeployedIdentity:
    """Who the deployment says the reviewer is.

    ``name`` is "" when nobody can be named; ``problem`` then says why in a sentence for the page
    (the request did not come through the trusted proxy, the header was repeated or missing, the
    user is not signed in), and no review can be saved.
    """

    name: str
    source: str  # IDENTITY_HEADER | IDENTITY_LOGIN
    problem: str = ""


def read_proxy_secret(path: str | os.PathLike) -> str:
    """The shared secret in ``path`` (surrounding whitespace removed).

    Raises :class:`~medxray.errors.ConfigError` when the file is missing or unreadable, holds
    fewer than :data:`MIN_PROXY_SECRET_CHARS` characters, or is readable by every local user (a
    local process could then read it and pose as the proxy: ``chmod 600`` it).
    """
    from medxray.errors import ConfigError

    p = Path(path)
    try:
        info = p.stat()
        secret = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the proxy secret file {p}: {getattr(exc, 'strerror', None) or exc}; "
            "create it with `openssl rand -hex 32 > FILE && chmod 600 FILE`"
        ) from None
    if info.st_mode & 0o004:
        raise ConfigError(
            f"the proxy secret file {p} is readable by every user of this machine, who could then "
            f"pose as the proxy; run `chmod 600 {p}`"
        )
    if len(secret) < MIN_PROXY_SECRET_CHARS:
        raise ConfigError(
            f"the proxy secret in {p} is shorter than {MIN_PROXY_SECRET_CHARS} characters; make one "
            "with `openssl rand -hex 32`"
        )
    return secret


def _values(headers: Any, name: str) -> list[str]:
    """Every value of header ``name`` (case-insensitive), repeats kept.

    ``headers``: Streamlit's ``st.context.headers`` (``get_all``), or a mapping of name to a value
    or a list of values.
    """
    if headers is None:
        return []
    get_all = getattr(headers, "get_all", None)
    if callable(get_all):
        return [str(v) for v in get_all(name)]
    out: list[str] = []
    for k, v in headers.items():
        if str(k).lower() == name.lower():
            out.extend(str(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    return out


def reviewer_identity(
    cfg: AppSettings, *, headers: Any = None, user: Mapping[str, Any] | None = None, proxy_secret: str | None = None
) -> DeployedIdentity | None:
    """Who the deployment says the reviewer is, or None when the name is typed (no deployment identity).

    With ``login``: the signed-in OIDC user (``st.user``: email, else name).
    With ``identity_header``: that request header, believed only when (1) the request carries
    :data:`PROXY_SECRET_HEADER` exactly once and its value equals ``proxy_secret`` (compared
    with :func:`hmac.compare_digest`, so the time taken says nothing about the secret) and
    (2) the identity header appears exactly once (a client that sends its own copy before a proxy
    that appends one gets refused, not trusted). Anything else gives ``name=""`` and a
    ``problem``; nothing is guessed. Header names are matched case-insensitively (RFC 9110
    section 5.1). ``headers`` is ``st.context.headers`` or a mapping (values: str or list of str).
    """
    import hmac

    if cfg.login:
        u = dict(user or {})
        name = str(u.get("email") or u.get("name") or "").strip() if u.get("is_logged_in") else ""
        return DeployedIdentity(name, IDENTITY_LOGIN, "" if name else "not signed in")
    if not cfg.identity_header:
        return None
    untrusted = (
        f"this request did not come through the trusted reverse proxy (it lacks the proxy's "
        f"{PROXY_SECRET_HEADER} header, or carries a wrong or repeated one), so the "
        f"{cfg.identity_header} header is not believed and reviews cannot be saved; open the app through "
        "the proxy's address"
    )
    if not proxy_secret or cfg.identity_header.strip().lower() == PROXY_SECRET_HEADER.lower():
        return DeployedIdentity(
            "",
            IDENTITY_HEADER,
            "the app was started with --identity-header but without a "
            "usable --proxy-secret-file, so no request can be trusted; restart it with both",
        )
    secrets = _values(headers, PROXY_SECRET_HEADER)
    if len(secrets) != 1 or not hmac.compare_digest(secrets[0].strip().encode("utf-8"), proxy_secret.encode("utf-8")):
        return DeployedIdentity("", IDENTITY_HEADER, untrusted)
    names = _values(headers, cfg.identity_header)
    if not names or not names[0].strip():
        return DeployedIdentity(
            "",
            IDENTITY_HEADER,
            f"the reverse proxy did not send the {cfg.identity_header} "
            "header, so the reviewer is unknown and reviews cannot be saved; ask IT to check "
            "the proxy",
        )
    if len(names) > 1:
        return DeployedIdentity(
            "",
            IDENTITY_HEADER,
            f"the {cfg.identity_header} header appears {len(names)} times "
            "in this request (a client may have sent its own), so the reviewer is unknown and "
            "reviews cannot be saved; the proxy must overwrite the header, not add to it",
        )
    name = names[0].strip()
    if len(name) > MAX_REVIEWER_NAME_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return DeployedIdentity(
            "",
            IDENTITY_HEADER,
            f"the {cfg.identity_header} header is not a usable name (longer "
            f"than {MAX_REVIEWER_NAME_CHARS} characters or with control characters); reviews "
            "cannot be saved",
        )
    return DeployedIdentity(name, IDENTITY_HEADER)


# What each DICOM refusal code (medxray.dicom.codes.REASON_CODES; a test keeps the keys equal)
# means, as the start of a sentence for a reviewer. results.csv keeps the codes; pages show these.
REASON_SENTENCES: dict[str, str] = {
    "not_dicom": "Not a DICOM file",
    "unreadable": "The DICOM header is damaged",
    "truncated": "The file is cut short",
    "no_pixel_data": "The file holds no image",
    "short_pixel_data": "The image data is incomplete",
    "multi_frame": "A multi-frame object, not a single radiograph",
    "colour": "A colour image, not a grayscale radiograph",
    "missing_attribute": "A required DICOM attribute is missing",
    "modality": "Not a modality the scorer accepts",
    "too_large": "Larger than the size limit",
    "unsupported": "An image the reader does not handle",
    "decode_failed": "The compressed image could not be decoded",
    "bit_depth_mismatch": "The bit depth in the header does not match the pixels",
    "flat_image": "The image is blank after windowing",
}
_CODE_PREFIX = re.compile(r"^([a-z][a-z0-9_]*):\s*(.*)$", re.DOTALL)


def reason_sentence(reason: str) -> str:
    """A ``code: message`` reason (results.csv, :class:`~medxray.errors.DicomError`) as a sentence.

    ``"not_dicom: no DICM marker"`` -> ``"Not a DICOM file: no DICM marker."``; a reason without a
    known code is returned with its first letter capitalised. Empty stays empty.
    """
    text = str(reason or "").strip()
    if not text:
        return ""
    m = _CODE_PREFIX.match(text)
    if m and (m.group(1) in REASON_SENTENCES or "_" in m.group(1)):
        head = REASON_SENTENCES.get(m.group(1), m.group(1).replace("_", " ").capitalize())
        text = f"{head}: {m.group(2)}" if m.group(2) else head
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def user_message(exc: BaseException) -> str:
    """One line for the page: our own errors say what to do; anything else is summarised, not dumped."""
    if isinstance(exc, MedxrayError):
        return reason_sentence(str(exc)) if getattr(exc, "code", None) else str(exc)
    return (
        f"Unexpected error ({type(exc).__name__}): {str(exc).splitlines()[0][:200] if str(exc) else ''} "
        "- the details are in the app's log."
    )


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

        raise ConfigError(
            f"the app's entry file {entry} is missing; run `medxray app` from a medxray source "
            "checkout (pip install -e .)"
        )
    return entry


def streamlit_command(
    cfg: AppSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8501,
    open_browser: bool = False,
    python: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment for ``streamlit run`` of the app with these settings.

    Settings travel as environment variables (read by :meth:`AppSettings.from_env` in every
    page). The safe defaults live in ``app/.streamlit/config.toml`` (Streamlit reads a
    ``.streamlit/config.toml`` beside the main script, so plain ``streamlit run app/medxray_app.py``
    gets them too); the flags here repeat the ones that must hold whatever config files a user
    has (loopback address, no usage statistics, minimal toolbar) and set the upload cap to the
    app's own limit, so the uploader states one number.
    """
    import sys

    argv = [
        python or sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app_entry_path()),
        "--server.address",
        host,
        "--server.port",
        str(int(port)),
        "--server.headless",
        "false" if open_browser else "true",
        "--server.maxUploadSize",
        str(cfg.max_upload_mb),
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "minimal",
        "--client.showErrorDetails",
        "none",
        "--global.showWarningOnDirectExecution",
        "false",
    ]
    return argv, cfg.to_env()


def check_app_settings(cfg: AppSettings) -> None:
    """Fail fast, before starting a server, on settings that cannot work."""
    from medxray.errors import CheckpointError

    if cfg.checkpoint is not None and not cfg.checkpoint.is_file() and not (cfg.checkpoint / "CURRENT").is_file():
        what = (
            "is a folder but not a model registry with a current version"
            if cfg.checkpoint.is_dir()
            else "does not exist"
        )
        raise CheckpointError(
            f"checkpoint {cfg.checkpoint} {what}; train one with `make demo` or `medxray finetune` (or promote one "
            "with `medxray site promote`), or leave out --checkpoint to browse results only"
        )
    for root in cfg.results:
        if not root.is_dir():
            raise DataError(
                f"results folder {root} does not exist; write one with "
                f"`medxray score-dicom INPUT --checkpoint C --out {root}`"
            )
    if cfg.identity_header and cfg.proxy_secret_file is None:
        raise ConfigError(
            f"--identity-header {cfg.identity_header} needs --proxy-secret-file FILE: the app believes "
            f"the header only on requests that also carry the proxy's secret in {PROXY_SECRET_HEADER}; "
            "make one with `openssl rand -hex 32 > FILE && chmod 600 FILE` and set the same value in "
            "the proxy"
        )
    if cfg.identity_header.strip().lower() == PROXY_SECRET_HEADER.lower():
        raise ConfigError(
            f"--identity-header cannot be {PROXY_SECRET_HEADER}: that header carries the proxy's secret; "
            "name the header that carries the user (e.g. X-Forwarded-User)"
        )
    if cfg.proxy_secret_file is not None:
        if not cfg.identity_header:
            raise ConfigError("--proxy-secret-file is used only with --identity-header; give both or neither")
        read_proxy_secret(cfg.proxy_secret_file)
    ReviewStore(cfg.reviews)  # creates the folder and database, or says why it cannot
