"""Production monitoring: ``medxray site monitor`` (run it from cron) and the app's Monitoring page.

From the scorer's ``results.csv`` folders, the review store and the deployed checkpoint, per day
and per ISO week:

* volume (images scored, errors), the out-of-distribution flag rate (``ood_distance`` over the
  checkpoint's threshold, or rows the OOD policy skipped);
* the positive-call rate per finding (the ``positive_findings`` the scorer reported);
* the shift of each finding's score distribution from the checkpoint's validation distribution
  (:mod:`medxray.site.reference`): population stability index over the reference's deciles, less
  its small-sample noise floor (:func:`medxray.site.stats.psi_noise_floor`), with the usual levels
  (>= 0.10 warn, >= 0.25 alert);
* reviewer agreement with the model per finding (agree / (agree + disagree)) and time to review
  (first review minus the time the image was scored or first seen).

A row's time is its ``scored_at_utc`` column when the results carry one, else the time this
monitor first saw it (kept in ``MONITOR_DIR/seen.csv``; ``--as-of`` sets it for a backfill). Alerts
(for days with at least ``min_images`` images): PSI >= 0.10 (warn) or 0.25 (alert) on a finding; an
OOD rate whose 99.7% Wilson lower bound exceeds twice the expected rate; a positive-call rate whose
99.7% Wilson interval excludes the validation rate and differs from it by more than a factor of two
(99.7%, not 95%: 14 findings a day for a year would otherwise raise false alerts every week).

Writes ``monitor.json``, ``daily.csv``, ``medxray.prom`` (Prometheus text format, for
node_exporter's textfile collector: ``medxray_*`` gauges, replaced atomically) and plots
(``volume_ood.png``, ``psi.png``, ``positive_rate.png``) into ``MONITOR_DIR``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medxray.errors import ConfigError, DataError
from medxray.fileio import atomic_output, atomic_write_text, to_jsonable
from medxray.site.stats import PSI_ALERT, PSI_WARN, histogram, psi, psi_level, psi_noise_floor, quantile_edges, wilson

log = logging.getLogger(__name__)

SEEN = "seen.csv"
PROM = "medxray.prom"
MIN_IMAGES = 20
ALERT_Z = 3.0  # Wilson intervals for rate alerts: ~99.7%, so 14 findings x 365 days raise few false alerts


@dataclass(frozen=True)
class Alert:
    day: str
    kind: str  # psi | ood_rate | positive_rate
    finding: str
    level: str  # warn | alert
    message: str


@dataclass
class MonitorResult:
    days: dict[str, dict[str, Any]] = field(default_factory=dict)
    weeks: dict[str, dict[str, Any]] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def _parse_time(text: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _load_seen(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {r["key"]: r["first_seen_utc"] for r in csv.DictReader(fh) if r.get("key")}


def _day_stats(
    rows: Sequence[dict[str, Any]],
    base: _Baseline,
    min_images: int,
    day: str,
    alerts: list[Alert] | None,
) -> dict[str, Any]:
    """One day's (or week's) figures: images, errors, OOD flag rate, and per finding the positive-call
    rate and PSI against the validation reference (raw and above its noise floor). With ``alerts``
    (days only, from ``min_images`` scored images) the alerts raised are appended to it."""
    ok = [r for r in rows if r["status"] in ("ok", "skipped")]
    n = len(ok)
    flagged = sum(1 for r in ok if r["ood"])
    st: dict[str, Any] = {
        "images": n,
        "errors": sum(1 for r in rows if r["status"] == "error"),
        "ood_flagged": flagged,
        "ood_rate": flagged / n if n else float("nan"),
        "positive_rate": {},
        "psi": {},
        "psi_level": {},
    }
    scored = [r for r in ok if r["status"] == "ok"]
    for f in base.names:
        k = sum(1 for r in scored if f in r["positives"])
        st["positive_rate"][f] = k / len(scored) if scored else float("nan")
        vals = [r["probs"][f] for r in scored if f in r["probs"]]
        raw = float("nan")
        v = float("nan")
        if f in base.ref_hist and vals:
            edges, counts = base.ref_hist[f]
            raw = psi(counts, histogram(np.asarray(vals), edges))
            v = max(0.0, raw - psi_noise_floor(len(counts), int(sum(counts)), len(vals)))
        st["psi"][f] = v
        st.setdefault("psi_raw", {})[f] = raw
        st["psi_level"][f] = psi_level(v)
        if alerts is not None and len(scored) >= min_images:
            alerts.extend(_finding_alerts(day, f, v, k, len(scored), base.ref_pos.get(f)))
    if alerts is not None and base.ood_expected is not None and n >= min_images:
        lo, hi = wilson(flagged, n, z=ALERT_Z)
        if lo > 2 * base.ood_expected:
            alerts.append(
                Alert(
                    day,
                    "ood_rate",
                    "",
                    "alert",
                    f"out-of-distribution flag rate {flagged / n:.1%} (99.7% CI {lo:.1%}-{hi:.1%}); "
                    f"about {base.ood_expected:.0%} expected",
                )
            )
    return st


def _finding_alerts(day: str, f: str, v: float, k: int, n_scored: int, r0: float | None) -> list[Alert]:
    """A finding's alerts of one day: PSI ``v`` at the warn/alert level, and a positive-call rate
    (``k`` of ``n_scored``) whose 99.7% Wilson interval lies beyond half or twice the validation
    rate ``r0``."""
    out = []
    if math.isfinite(v) and v >= PSI_WARN:
        lvl = "alert" if v >= PSI_ALERT else "warn"
        out.append(
            Alert(
                day,
                "psi",
                f,
                lvl,
                f"{f}: score distribution shifted from validation (PSI {v:.2f}, "
                f"{lvl} level {PSI_ALERT if lvl == 'alert' else PSI_WARN:g})",
            )
        )
    if r0 is not None and r0 > 0:
        lo, hi = wilson(k, n_scored, z=ALERT_Z)
        rate = k / n_scored
        if (rate > 2 * r0 and lo > r0) or (rate < r0 / 2 and hi < r0):
            out.append(
                Alert(
                    day,
                    "positive_rate",
                    f,
                    "alert",
                    f"{f}: positive-call rate {rate:.1%} (99.7% CI {lo:.1%}-{hi:.1%}) vs {r0:.1%} in validation",
                )
            )
    return out


@dataclass(frozen=True)
class _Baseline:
    """What the deployed checkpoint says to expect: its findings and thresholds, the OOD threshold
    and expected flag rate, and per finding the validation reference's score histogram (quantile
    bin edges, counts) and positive rate at the threshold (empty without a reference)."""

    names: list[str]
    thresholds: dict[str, float]
    ood_threshold: Any  # as stored in the checkpoint's ``ood`` metadata (None: no OOD statistics)
    ood_expected: float | None
    ref_hist: dict[str, tuple[list[float], list[int]]]
    ref_pos: dict[str, float]
    has_reference: bool


def _baseline(ck_path: Any, meta: Mapping[str, Any]) -> _Baseline:
    """The :class:`_Baseline` of the checkpoint at ``ck_path`` with metadata ``meta``."""
    from medxray.site.reference import validation_reference

    names = list(meta.get("label_names") or [])
    thresholds = {n: float((meta.get("thresholds") or {}).get(n, 0.5)) for n in names}
    ood_meta = meta.get("ood") if isinstance(meta.get("ood"), Mapping) else {}
    ood_thr = ood_meta.get("threshold")
    ood_expected = (
        (1 - float(ood_meta["percentile"]) / 100) if "percentile" in ood_meta else (0.05 if ood_thr else None)
    )
    ref = validation_reference(ck_path, meta)
    ref_hist: dict[str, tuple[list[float], list[int]]] = {}
    ref_pos: dict[str, float] = {}
    if ref is not None:
        for c, n in enumerate(ref.label_names):
            edges = quantile_edges(ref.probs[:, c])
            ref_hist[n] = (edges, histogram(ref.probs[:, c], edges))
            ref_pos[n] = float((ref.probs[:, c] >= thresholds.get(n, 0.5)).mean())
    return _Baseline(names, thresholds, ood_thr, ood_expected, ref_hist, ref_pos, ref is not None)


def monitor(
    results: Sequence[str | os.PathLike],
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    reviews: str | os.PathLike | None = None,
    as_of: str | None = None,
    min_images: int = MIN_IMAGES,
) -> MonitorResult:
    """Update the monitor's state and write its outputs (module docstring)."""
    from medxray.checkpoint import load_checkpoint
    from medxray.site.registry import current_checkpoint

    ck_path = current_checkpoint(checkpoint)
    meta = load_checkpoint(ck_path).metadata
    base = _baseline(ck_path, meta)
    names = base.names
    now = _parse_time(as_of) if as_of else datetime.now(timezone.utc)
    if now is None:
        raise ConfigError(f"--as-of must be an ISO date/time (e.g. 2026-01-31T08:00:00Z), got {as_of!r}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    seen = _load_seen(out / SEEN)
    n_seen = len(seen)
    rows = [r for d in results for r in _read_results(d, base, seen, now)]
    if len(seen) > n_seen:
        _save_seen(out / SEEN, seen)
    res = MonitorResult()
    by_day: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_week: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        day = r["time"].date()
        by_day[day.isoformat()].append(r)
        iso = day.isocalendar()
        by_week[f"{iso[0]}-W{iso[1]:02d}"].append(r)
    for day in sorted(by_day):
        res.days[day] = _day_stats(by_day[day], base, min_images, day, res.alerts)
    for wk in sorted(by_week):
        res.weeks[wk] = _day_stats(by_week[wk], base, min_images, wk, None)
    if reviews is not None:
        _add_reviews(res, reviews, rows, names)
    res.files = _write(res, out, names, meta, base.has_reference)
    for a in res.alerts:
        if a.day == max(res.days, default=""):
            log.warning("monitor %s: %s", a.level.upper(), a.message)
    return res


def _read_results(d: str | os.PathLike, base: _Baseline, seen: dict[str, str], now: datetime) -> list[dict[str, Any]]:
    """The scorer's result rows of one ``--out`` folder (or results file) as monitor rows (time,
    status, OOD flag, probabilities, positive findings, SOP Instance UID, file name). A row without
    a scoring time takes the time it was first seen, recorded in ``seen`` (updated in place)."""
    from medxray.scoring.journal import RESULTS_NAME
    from medxray.scoring.journal import read_results as read_journal

    d = Path(d).expanduser()
    f = d / RESULTS_NAME if d.is_dir() else d
    if not f.is_file():
        raise DataError(f"--results {d}: no {RESULTS_NAME}; pass the scorer's --out folder")
    header, recs, _ = read_journal(f)
    col = {h: i for i, h in enumerate(header)}
    rows = []
    for rec in recs:

        def get(k: str, rec: list[str] = rec) -> str:
            return rec[col[k]] if k in col else ""

        key = f"{f.parent.resolve()}::{get('path')}"
        t = _parse_time(get("scored_at_utc")) if get("scored_at_utc") else None
        if t is None:
            if key not in seen:
                seen[key] = now.isoformat(timespec="seconds")
            t = _parse_time(seen[key])
        dist = get("ood_distance")
        try:
            is_ood = base.ood_threshold is not None and dist != "" and float(dist) > float(base.ood_threshold)
        except ValueError:
            is_ood = False
        is_ood = is_ood or (get("status") == "skipped" and "ood" in get("reason").lower())
        probs = {}
        for n in base.names:
            try:
                probs[n] = float(get(f"p_{n}"))
            except ValueError:
                pass
        rows.append(
            {
                "time": t,
                "status": get("status"),
                "ood": is_ood,
                "probs": probs,
                "positives": set(x for x in get("positive_findings").replace("|", ";").split(";") if x),
                "sop": get("sop_instance_uid"),
                "name": Path(get("path")).name,
            }
        )
    return rows


def _save_seen(path: Path, seen: Mapping[str, str]) -> None:
    """``seen.csv``: when each result row without a scoring time was first seen, sorted by key."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["key", "first_seen_utc"])
    for k, v in sorted(seen.items()):
        w.writerow([k, v])
    atomic_write_text(path, buf.getvalue())


def _add_reviews(
    res: MonitorResult, reviews: str | os.PathLike, rows: Sequence[dict[str, Any]], names: Sequence[str]
) -> None:
    from medxray.site.labels import read_reviews

    verdicts = read_reviews(reviews)
    t_of: dict[str, datetime] = {}
    for r in rows:
        for k in (r["sop"], r["name"]):
            if k:
                t_of.setdefault(k, r["time"])
    agree: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    delays: dict[str, list[float]] = defaultdict(list)
    first: dict[str, datetime] = {}
    for v in verdicts:
        t = _parse_time(v.saved_at_utc)
        if t is None:
            continue
        day = t.date().isoformat()
        if v.verdict in ("agree", "disagree"):
            c = agree[day][v.finding]
            c[0] += v.verdict == "agree"
            c[1] += 1
        key = (
            v.sop_instance_uid
            or next((p for p in v.image_key.replace("|", "/").split("/") if p in t_of), "")
            or v.image_key
        )
        if key not in t_of and v.file_name in t_of:
            key = v.file_name
        if key in t_of and key not in first:
            first[key] = t
            delays[day].append(max(0.0, (t - t_of[key]).total_seconds() / 3600))
    for day in sorted(set(agree) | set(delays)):
        st = res.days.setdefault(day, {"images": 0})
        st["review_agreement"] = {f: a / n for f, (a, n) in agree[day].items() if n}
        st["reviewed_images"] = len(delays[day])
        st["median_hours_to_review"] = float(np.median(delays[day])) if delays[day] else float("nan")


def _prom_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def prometheus_text(res: MonitorResult, names: Sequence[str], model_version: str) -> str:
    """The latest day's gauges in the Prometheus text exposition format (textfile collector)."""
    lines: list[str] = []
    day = max((d for d, s in res.days.items() if s.get("images")), default=None)
    st = res.days.get(day, {}) if day else {}
    mv = _prom_escape(model_version)

    def gauge(name: str, help_: str, samples: Sequence[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} gauge")
        for labels, v in samples:
            lab = ",".join(f'{k}="{_prom_escape(x)}"' for k, x in {"model_version": mv, **labels}.items())
            val = "NaN" if not (isinstance(v, (int, float)) and math.isfinite(v)) else f"{float(v):.6g}"
            lines.append(f"{name}{{{lab}}} {val}")

    gauge("medxray_images_scored", "Images scored on the latest day with data", [({}, st.get("images", 0))])
    gauge("medxray_scoring_errors", "Scoring errors on the latest day", [({}, st.get("errors", 0))])
    gauge(
        "medxray_ood_flag_rate",
        "Share of the latest day's images flagged out of distribution",
        [({}, st.get("ood_rate", float("nan")))],
    )
    gauge(
        "medxray_positive_rate",
        "Share of the latest day's images called positive, per finding",
        [({"finding": f}, st.get("positive_rate", {}).get(f, float("nan"))) for f in names],
    )
    gauge(
        "medxray_score_psi",
        "Population stability index of the latest day's scores vs validation, per finding",
        [({"finding": f}, st.get("psi", {}).get(f, float("nan"))) for f in names],
    )
    gauge(
        "medxray_review_agreement",
        "Share of agree among agree/disagree verdicts on the latest day, per finding",
        [({"finding": f}, v) for f, v in sorted(st.get("review_agreement", {}).items())],
    )
    gauge(
        "medxray_review_delay_hours",
        "Median hours from scoring to first review on the latest day",
        [({}, st.get("median_hours_to_review", float("nan")))],
    )
    todays = [a for a in res.alerts if a.day == day]
    gauge(
        "medxray_alert",
        "1 for each alert raised on the latest day",
        [({"kind": a.kind, "finding": a.finding, "level": a.level}, 1) for a in todays]
        or [({"kind": "none", "finding": "", "level": "ok"}, 0)],
    )
    gauge(
        "medxray_monitor_last_run_timestamp_seconds",
        "When the monitor last ran (Unix time)",
        [({}, datetime.now(timezone.utc).timestamp())],
    )
    return "\n".join(lines) + "\n"


def _plots(res: MonitorResult, out: Path, names: Sequence[str]) -> dict[str, Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from medxray.labels import display_name

    days = sorted(d for d, s in res.days.items() if s.get("images"))
    files: dict[str, Path] = {}
    if not days:
        return files
    x = np.arange(len(days))

    def save(fig: Any, name: str) -> None:
        with atomic_output(out / name, "wb") as fh:
            fig.savefig(fh, format="png")
        files[name.removesuffix(".png")] = out / name

    fig = Figure(figsize=(8, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(x, [res.days[d]["images"] for d in days], color="#9ab")
    ax.set_ylabel("images scored")
    ax2 = ax.twinx()
    ax2.plot(x, [res.days[d]["ood_rate"] for d in days], color="#c33", marker="o")
    ax2.set_ylabel("OOD flag rate", color="#c33")
    ax2.set_ylim(0, 1)
    ax.set_xticks(x, days, rotation=45, fontsize=7)
    ax.set_title("Volume and out-of-distribution rate per day")
    fig.tight_layout()
    save(fig, "volume_ood.png")
    for key, fname, title, ylab in (
        ("psi", "psi.png", "Score shift from validation (PSI)", "PSI"),
        ("positive_rate", "positive_rate.png", "Positive-call rate per finding", "rate"),
    ):
        fig = Figure(figsize=(8, 3.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for f in names:
            ys = [res.days[d][key].get(f, float("nan")) for d in days]
            if any(math.isfinite(y) and y > 0 for y in ys):
                ax.plot(x, ys, marker=".", lw=1, label=display_name(f))
        if key == "psi":
            ax.axhline(PSI_WARN, color="orange", ls="--", lw=1)
            ax.axhline(PSI_ALERT, color="red", ls="--", lw=1)
        ax.set_xticks(x, days, rotation=45, fontsize=7)
        ax.set_ylabel(ylab)
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        save(fig, fname)
    return files


def _write(
    res: MonitorResult, out: Path, names: Sequence[str], meta: Mapping[str, Any], has_ref: bool
) -> dict[str, Path]:
    mv = str(meta.get("model_version") or "unversioned")
    files = {"json": out / "monitor.json", "daily": out / "daily.csv", "prom": out / PROM}
    atomic_write_text(
        files["json"],
        json.dumps(
            to_jsonable(
                {
                    "model_version": mv,
                    "generated_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "validation_reference": has_ref,
                    "days": res.days,
                    "weeks": res.weeks,
                    "alerts": [a.__dict__ for a in res.alerts],
                }
            ),
            indent=1,
        )
        + "\n",
    )
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["day", "images", "errors", "ood_rate", *(f"pos_{f}" for f in names), *(f"psi_{f}" for f in names)])
    for d, s in sorted(res.days.items()):
        if "positive_rate" not in s:
            continue
        w.writerow(
            [
                d,
                s["images"],
                s["errors"],
                f"{s['ood_rate']:.4f}",
                *(f"{s['positive_rate'][f]:.4f}" for f in names),
                *(f"{s['psi'][f]:.4f}" for f in names),
            ]
        )
    atomic_write_text(files["daily"], buf.getvalue())
    atomic_write_text(files["prom"], prometheus_text(res, names, mv))
    files.update(_plots(res, out, names))
    return files


def read_monitor(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The last ``monitor.json`` of a monitor folder (what the app's Monitoring page shows)."""
    p = Path(out_dir).expanduser() / "monitor.json"
    if not p.is_file():
        raise DataError(
            f"no monitor output in {p.parent}; run `medxray site monitor --out {p.parent}` (e.g. from cron)"
        )
    return json.loads(p.read_text())


def monitor_view(data: Mapping[str, Any]) -> dict[str, Any]:
    """What the app's Monitoring page shows, from :func:`read_monitor`'s dict, Streamlit-free:
    ``latest`` day, its ``alerts`` (level, kind, finding, message), ``daily`` rows (day, images, OOD
    rate, max PSI and its finding) and ``psi`` rows of the latest day per finding."""
    days = data.get("days") or {}
    scored = sorted(d for d, s in days.items() if s.get("images"))
    latest = scored[-1] if scored else None
    alerts = [a for a in data.get("alerts") or [] if a.get("day") == latest]
    daily = []
    for d in scored:
        s = days[d]
        psis = {f: v for f, v in (s.get("psi") or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
        worst = max(psis, key=psis.get) if psis else ""
        daily.append(
            {
                "day": d,
                "images": s.get("images", 0),
                "errors": s.get("errors", 0),
                "OOD rate": s.get("ood_rate"),
                "max PSI": psis.get(worst),
                "finding (max PSI)": worst,
                "alerts": sum(1 for a in data.get("alerts") or [] if a.get("day") == d),
            }
        )
    st = days.get(latest, {}) if latest else {}
    per_finding = [
        {
            "finding": f,
            "positive rate": st.get("positive_rate", {}).get(f),
            "PSI": st.get("psi", {}).get(f),
            "level": st.get("psi_level", {}).get(f),
            "review agreement": (st.get("review_agreement") or {}).get(f),
        }
        for f in sorted(st.get("psi") or {})
    ]
    return {
        "latest": latest,
        "alerts": alerts,
        "daily": daily,
        "per_finding": per_finding,
        "model_version": data.get("model_version", ""),
        "generated_utc": data.get("generated_utc", ""),
    }
