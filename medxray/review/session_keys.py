"""Every Streamlit session-state and widget key of the review app, built in one place.

Streamlit keeps a widget's value in ``st.session_state[key]``; a key typed twice by hand that
differs by one letter silently loses a reviewer's verdict, and two keys that happen to be equal
share one value. So the pages and :mod:`medxray.review.ui` / :mod:`medxray.review.ui_study` never
write a key literal: fixed keys are the constants of :class:`AppKeys`, per-study keys come from
:class:`StudyKeys`, per-folder worklist filters from :class:`WorklistKeys`
(``tests/test_app_session_keys.py`` checks the app's source for key literals).

The key space is prefix-free by construction: each family is ``<prefix>_<id>`` with a prefix no
fixed key starts with; a study's id is the first 16 hex digits of its file's SHA-256 (fixed
length, so ``verdict_<id>_<finding>`` of two studies never meet whatever the finding's name);
a worklist's id is 10 hex digits of a hash of the folder and its statuses. The key strings are
those the app has always used (browser sessions and tests address widgets by them), except the
threshold reset button, renamed ``thresholds_reset`` so that no finding called "reset" can reach
it through ``thr_<finding>``.

Plain Python: no streamlit, nothing of medxray (the key objects are unit-tested alone).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final, Sequence

STUDY_ID_LENGTH: Final = 16  # hex digits of the file's SHA-256 naming a study's widgets
WORKLIST_ID_LENGTH: Final = 10


def _check_hex(value: str, length: int, what: str) -> None:
    if len(value) != length or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"{what} must be {length} lowercase hex digits, got {value!r}")


class AppKeys:
    """Keys used once per browser session (not per study); constants, plus the two key families
    without an id of their own (operating thresholds per finding, an export button's history twin)."""

    # Study page: which study, where it came from
    STUDY_ROW: Final = "study_row"  # results.csv row on screen (the Study selectbox)
    STUDY_URL_SEEN: Final = "study_url_seen"  # the ?study= value already followed
    STUDY_SOURCE: Final = "study_source"  # upload or results folder (radio)
    STUDY_REQUEST: Final = "study_request"  # {"row": int}: set by the worklist, read once by the Study page
    UPLOAD: Final = "upload"
    UPLOAD_T0: Final = "upload_t0"  # {file_id: time.monotonic()} of each upload's first sight
    NAV_PREV: Final = "nav_prev"  # K
    NAV_NEXT: Final = "nav_next"  # J
    NAV_UNREVIEWED: Final = "nav_unreviewed"  # N
    # Study page: map display
    CAM_ON: Final = "cam_on"
    CAM_STYLE: Final = "cam_style"
    CAM_ALPHA: Final = "cam_alpha"
    # review
    VERDICT_AGREE: Final = "v_agree"  # A
    VERDICT_DISAGREE: Final = "v_disagree"  # D
    VERDICT_UNSURE: Final = "v_unsure"  # U
    FINDING_PREV: Final = "f_prev"  # Up
    FINDING_NEXT: Final = "f_next"  # Down
    SAVE_REVIEW: Final = "save_review"  # Ctrl+Enter
    AUTO_ADVANCE: Final = "auto_advance"
    REVIEW_FLASH: Final = "review_flash"  # (kind, message) shown once on the next run
    REVIEWER_NAME: Final = "reviewer_name"
    SIGN_IN: Final = "sign_in"
    # sidebar, worklist, results folders
    THRESHOLDS_RESET: Final = "thresholds_reset"
    RESULTS_DIR: Final = "results_dir"
    RESULTS_CHOICE: Final = "results_choice"
    RESULTS_TYPED: Final = "results_typed"
    WORKLIST_ORDER: Final = "wl_order"  # {folder: [row, ...]}: the Study page steps in this order
    WORKLIST_START: Final = "wl_start"
    EXPORT_SIDEBAR: Final = "export_sidebar"
    EXPORT_WORKLIST: Final = "export_worklist"
    # model card tables
    CARD_SUMMARY: Final = "card_summary"
    CARD_PROVENANCE: Final = "card_provenance"
    CARD_TRAINING: Final = "card_training"
    CARD_LOCALISATION: Final = "card_localisation"
    CARD_THRESHOLDS: Final = "card_thresholds"

    THRESHOLD_PREFIX: Final = "thr_"

    @staticmethod
    def threshold(finding: str) -> str:
        """The sidebar slider holding this session's operating threshold for ``finding``."""
        return AppKeys.THRESHOLD_PREFIX + str(finding)

    @staticmethod
    def export_history(export_key: str) -> str:
        """The review-history download button beside the reviews download button ``export_key``."""
        return f"{export_key}_history"

    @classmethod
    def fixed(cls) -> dict[str, str]:
        """Every constant key by attribute name (for checks that keys are distinct)."""
        return {k: v for k, v in vars(cls).items() if k.isupper() and k != "THRESHOLD_PREFIX" and isinstance(v, str)}


@dataclass(frozen=True)
class StudyKeys:
    """The keys of one study's widgets: viewing, current finding, verdicts, note.

    ``study_id``: the first :data:`STUDY_ID_LENGTH` hex digits of the file's SHA-256, so each new
    image starts with its own view and verdicts, and a reload of the same file finds them again.
    Raises ValueError for anything else.
    """

    study_id: str

    def __post_init__(self) -> None:
        _check_hex(self.study_id, STUDY_ID_LENGTH, "a study id")

    @classmethod
    def for_sha256(cls, sha256: str) -> StudyKeys:
        """From a file's SHA-256 (hex, as :attr:`medxray.review.study.StudyImage.sha256`)."""
        return cls(str(sha256)[:STUDY_ID_LENGTH].lower())

    def verdict(self, finding: str) -> str:
        """The radio holding the reviewer's verdict on ``finding`` (VERDICT_CHOICES)."""
        return f"verdict_{self.study_id}_{finding}"

    @property
    def current_finding(self) -> str:
        """The finding whose map is shown and which A/D/U apply to."""
        return f"cam_finding_{self.study_id}"

    @property
    def note(self) -> str:
        return f"note_{self.study_id}"

    @property
    def preset(self) -> str:
        return f"preset_{self.study_id}"

    @property
    def invert(self) -> str:
        return f"invert_{self.study_id}"

    @property
    def zoom(self) -> str:
        return f"zoom_{self.study_id}"

    @property
    def pan_x(self) -> str:
        return f"panx_{self.study_id}"

    @property
    def pan_y(self) -> str:
        return f"pany_{self.study_id}"

    @property
    def window_center(self) -> str:
        return f"wc_{self.study_id}"

    @property
    def window_width(self) -> str:
        return f"ww_{self.study_id}"

    @property
    def reset_view(self) -> str:
        return f"reset_{self.study_id}"

    def all(self, findings: Sequence[str] = ()) -> list[str]:
        """Every key of this study (the verdicts of ``findings`` included)."""
        fixed = [
            self.current_finding,
            self.note,
            self.preset,
            self.invert,
            self.zoom,
            self.pan_x,
            self.pan_y,
            self.window_center,
            self.window_width,
            self.reset_view,
        ]
        return fixed + [self.verdict(f) for f in findings]


@dataclass(frozen=True)
class WorklistKeys:
    """The worklist's filter widgets and table, keyed per results folder and per set of statuses
    present, so a new folder starts with its own values (every status chosen) and the chips
    always describe the rows below."""

    worklist_id: str

    def __post_init__(self) -> None:
        _check_hex(self.worklist_id, WORKLIST_ID_LENGTH, "a worklist id")

    @classmethod
    def for_folder(cls, folder: object, statuses: Sequence[str]) -> WorklistKeys:
        """From the results folder and the sorted statuses in it (SHA-1, a name, not a secret)."""
        digest = hashlib.sha1(f"{folder}|{list(statuses)}".encode(), usedforsecurity=False).hexdigest()
        return cls(digest[:WORKLIST_ID_LENGTH])

    @property
    def status(self) -> str:
        return f"wl_status_{self.worklist_id}"

    @property
    def finding(self) -> str:
        return f"wl_finding_{self.worklist_id}"

    @property
    def reviewed(self) -> str:
        return f"wl_reviewed_{self.worklist_id}"

    @property
    def sort(self) -> str:
        return f"wl_sort_{self.worklist_id}"

    @property
    def search(self) -> str:
        return f"wl_search_{self.worklist_id}"

    @property
    def warning(self) -> str:
        return f"wl_warning_{self.worklist_id}"

    @property
    def positive_only(self) -> str:
        return f"wl_positive_{self.worklist_id}"

    @property
    def table(self) -> str:
        return f"worklist_table_{self.worklist_id}"

    def all(self) -> list[str]:
        return [
            self.status,
            self.finding,
            self.reviewed,
            self.sort,
            self.search,
            self.warning,
            self.positive_only,
            self.table,
        ]
