"""What the review app reads from files is data, never instructions: contained paths and plain text.

Two kinds of fault this module closes (issue 19, items 7 and 8; DESIGN.md convention 13):

- **Paths from a results file stay under their root.** ``results.csv`` names the scored file
  (``path``) and the stored maps (``cam_dir``); a crafted or damaged table could name
  ``../../etc/passwd``, ``/home/someone/x.dcm`` or a symbolic link pointing out. Every such path
  goes through :func:`contained_path` (resolved with :func:`os.path.realpath`, so ``..`` and
  symbolic links are followed before the check) and is read with :func:`read_contained_bytes`
  (opened without following a final symbolic link and without blocking, and read only when it is
  a regular file within a byte limit, so a FIFO or a device cannot hang or flood the app).
- **Text from a file is shown as text.** Streamlit renders Markdown (GitHub-flavoured, with
  HTML, images, links, LaTeX and its own ``:color[...]`` / ``:material/...:`` directives) in
  ``st.markdown``, ``st.caption``, ``st.warning``/``st.error``/``st.info``/``st.success``, titles
  and widget labels. A DICOM Body Part Examined of ``![x](http://host/p)`` would make the browser
  fetch that URL. :func:`md_escape` turns any string into Markdown that renders as the same
  characters: every ASCII punctuation character is backslash-escaped (CommonMark 0.31 section
  2.4 "Backslash escapes": any ASCII punctuation may be escaped and is then literal), which
  neutralises emphasis, links, images, autolinks (``http\\:\\/\\/`` is no longer a URL), raw HTML
  (``\\<``), entities (``\\&``), code spans, tables, LaTeX (``\\$``) and directives (``\\:``);
  line breaks become spaces so no block structure (headings, lists, quotes) can start.
  Two renderer features act on the text *after* escapes are resolved, so escaping alone does not
  stop them: GFM's autolink literals (``http://...``, ``www.``, ``name@host``: the browser test
  showed ``http\\:\\/\\/...`` still became a link) and Streamlit's ``:shortcode:`` / ``:material/...:``
  / ``:color[...]`` syntax. An invisible U+2060 WORD JOINER after every ``:`` and ``@`` and
  between ``www`` and ``.`` breaks those patterns; the text reads (and prints) the same.

Imports nothing from Streamlit, torch or the other review modules.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Iterable, Sequence

from medxray.errors import DataError

__all__ = ["PathRefused", "contained_path", "md_escape", "read_contained_bytes", "MAX_SHOWN_CHARS"]

MAX_SHOWN_CHARS = 2000  # longest file text shown in one message (a bound on what a file can make us draw)

# Every ASCII punctuation character (CommonMark's definition), each escaped with one backslash.
_ASCII_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
_ESCAPES = {ord(c): "\\" + c for c in _ASCII_PUNCTUATION}
# Line and paragraph separators become spaces (no headings, lists, quotes or tables can start);
# other control characters are dropped (they have no business on a page).
_ESCAPES.update({ord(c): " " for c in "\r\n\t\v\f\x85\u2028\u2029"})
_ESCAPES.update({c: None for c in range(0x20) if chr(c) not in "\r\n\t\v\f"})
_ESCAPES[0x7F] = None
WORD_JOINER = "\u2060"  # zero width, no line break: breaks autolink and shortcode patterns invisibly
_AUTOLINK_BREAKS = re.compile(r"(?<=[:@])|(?i:(?<=www)(?=\\\.))")  # applied after escaping: "www" then "\."


def md_escape(text: object, *, max_chars: int = MAX_SHOWN_CHARS) -> str:
    """``text`` as Markdown that Streamlit shows as exactly these characters (one line).

    Args:
        text: anything; ``str()`` of it is escaped (None gives "").
        max_chars: longer texts are cut to this many characters and end with "...".

    Returns:
        The escaped string: each ASCII punctuation character preceded by a backslash
        (CommonMark 0.31, section 2.4), line breaks and tabs as spaces, other C0 control
        characters removed, a U+2060 WORD JOINER after each ``:`` and ``@`` and inside ``www.``
        (so GFM autolink literals and Streamlit shortcodes cannot form). Letters, digits,
        spaces and other non-ASCII characters are unchanged, so the rendered text reads as the
        original. Use it for every piece of file-derived text put into a Markdown-rendering
        Streamlit call; never escape a whole message that has our own Markdown in it.
    """
    s = "" if text is None else str(text)
    if len(s) > max_chars:
        s = s[:max_chars] + "..."
    s = s.replace(WORD_JOINER, "").translate(_ESCAPES)
    return _AUTOLINK_BREAKS.sub(WORD_JOINER, s)


class PathRefused(DataError):
    """A path read from a file that leads outside the folders it may name (or is not a plain file)."""


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(p))


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def contained_path(
    name: str, roots: Sequence[str | os.PathLike], *, what: str = "file", source: str = "results.csv"
) -> Path:
    """The real path of ``name`` (read from ``source``), if it lies inside one of ``roots``.

    Args:
        name: the path as the file gives it: relative (to each root in turn; the first root
            where it exists wins, else the first root) or absolute. ``~`` is not expanded.
        roots: the folders the file may name paths in (the results folder, the run's input
            folder). Resolved themselves, so a root reached through a link is fine.
        what: what the path is, for the message ("scored image", "stored map").
        source: the file the path was read from, for the message.

    Returns:
        The resolved path (symbolic links and ``..`` followed), inside a resolved root.

    Raises:
        PathRefused: empty, a NUL byte, no roots, or resolving outside every root (a ``..``
            walk, an absolute path elsewhere, or a symbolic link pointing out). Nothing is
            opened or read before the check.
    """
    text = str(name if name is not None else "")
    shown = md_safe_name(text)
    if not text.strip():
        raise PathRefused(f"{source} names no {what} for this row; nothing to open")
    if "\x00" in text:
        raise PathRefused(f"{source} names the {what} {shown!r}, which holds a NUL byte: refused, nothing was read")
    real_roots = [_real(r) for r in roots]
    if not real_roots:
        raise PathRefused(f"no folder is known that the {what} {shown!r} could be in; nothing was read")
    p = Path(text)
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [Path(r) / p for r in roots]
        candidates = [c for c in candidates if os.path.lexists(c)] or candidates[:1]
    for cand in candidates:
        real = _real(cand)
        if any(_within(real, r) for r in real_roots):
            return real
    cand = candidates[0]
    lexical = Path(os.path.normpath(cand))
    if any(_within(lexical, r) or _within(lexical, Path(os.path.normpath(rr))) for r, rr in zip(real_roots, roots)):
        why = "is a symbolic link (or lies under one) pointing outside"
    else:
        why = "lies outside"
    allowed = ", ".join(str(r) for r in real_roots)
    raise PathRefused(
        f"{source} names the {what} {shown!r}, which {why} the folders this results folder may use "
        f"({allowed}): refused, nothing was read. Re-run score-dicom, or fix the {source} row"
    )


def md_safe_name(text: str, max_chars: int = 300) -> str:
    """A path or name as it goes into an error message: control characters removed, length bounded."""
    s = "".join(ch for ch in str(text) if ch >= " " and ch != "\x7f")
    return s if len(s) <= max_chars else s[:max_chars] + "..."


def read_contained_bytes(
    name: str, roots: Sequence[str | os.PathLike], *, max_bytes: int, what: str = "file", source: str = "results.csv"
) -> tuple[Path, bytes]:
    """Read the file ``name`` (from ``source``) if it is a regular file inside ``roots``.

    Args:
        name, roots, what, source: as :func:`contained_path`.
        max_bytes: the most bytes read; a larger file is refused before reading.

    Returns:
        (resolved path, its bytes).

    Raises:
        PathRefused: outside the roots (:func:`contained_path`), or not a regular file (a FIFO,
            a device, a folder): refused without reading.
        DataError: missing, unreadable, or larger than ``max_bytes``.
    """
    path = contained_path(name, roots, what=what, source=source)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise DataError(
            f"the {what} {path} no longer exists; the stored results are shown in the worklist only"
        ) from None
    except OSError as exc:  # ELOOP: the last component became a link after the check
        raise PathRefused(f"cannot open the {what} {path}: {exc.strerror}; nothing was read") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PathRefused(
                f"the {what} {path} is not a regular file (a FIFO, device or folder): refused, nothing was read"
            )
        if info.st_size > max_bytes:
            raise DataError(
                f"the {what} {path.name} is {info.st_size / 2**20:.1f} MB, above this app's limit of "
                f"{max_bytes / 2**20:.0f} MB"
            )
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataError(f"the {what} {path.name} grew beyond this app's limit of {max_bytes / 2**20:.0f} MB")
    return path, data


def existing_roots(roots: Iterable[str | os.PathLike | None]) -> list[Path]:
    """The given roots that are set, in order, without duplicates (as given, not resolved)."""
    out: list[Path] = []
    for r in roots:
        if r is None or str(r) == "":
            continue
        p = Path(r)
        if p not in out:
            out.append(p)
    return out
