"""``medxray site ...``: argument parsing for the site loop; each handler calls one library function.

Registered by :func:`add_site_parser` from :mod:`medxray.cli`. Exit codes: 0 done (``promote``: promoted),
1 ``promote`` refused by the gate, 2 a user error (one line, no traceback).
"""

from __future__ import annotations

import argparse
import sys


def add_site_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("site", help="the site loop: reviews -> labels, validate, calibrate, promote, monitor")
    ssub = p.add_subparsers(dest="site_command", metavar="SITE_COMMAND", parser_class=type(p))
    ssub.required = True

    s = ssub.add_parser(
        "labels", help="turn review verdicts + scorer results into a CSV manifest (finetune --dataset csv)"
    )
    s.add_argument("--reviews", required=True, help="the app's review folder or its CSV export")
    s.add_argument("--results", required=True, action="append", help="a score-dicom --out folder (repeatable)")
    s.add_argument("--out", required=True, help="the labels CSV to write (site_labels.csv)")
    s.add_argument(
        "--secret",
        required=True,
        help="site secret file for the patient pseudonyms (HMAC key; created if missing; keep it outside "
        "every output folder)",
    )
    s.add_argument("--lock", default=None, help="locked test set file (default: site_lock.json beside --out)")
    s.add_argument("--lock-fraction", type=float, default=0.3, help="share of patients frozen as the locked set")
    s.add_argument(
        "--lock-min-patients",
        type=int,
        default=30,
        help="freeze the locked set once this many patients are labelled (default 30)",
    )
    s.add_argument("--val-fraction", type=float, default=0.2, help="patient-disjoint share of the rest marked val")
    s.add_argument(
        "--adjudicator", action="append", default=[], help="reviewer whose latest verdict decides (repeatable)"
    )
    s.set_defaults(func=_labels)

    s = ssub.add_parser("validate", help="site figures at the deployed thresholds beside the checkpoint's validation")
    s.add_argument("--checkpoint", required=True, help="checkpoint file or model registry folder (its current version)")
    s.add_argument("--labels", required=True)
    s.add_argument("--out", required=True, help="report folder")
    s.add_argument("--min-positives", type=int, default=10)
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=_validate)

    s = ssub.add_parser("calibrate", help="re-derive thresholds on the site's unlocked labels; write a new version")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--labels", required=True)
    s.add_argument("--out", required=True, help="the new checkpoint file (C_site.pt)")
    s.add_argument(
        "--operating-point", default="youden", help="youden (default) or sensitivity=X, e.g. sensitivity=0.9"
    )
    s.add_argument("--site", default="site", help="site name recorded in the provenance")
    s.add_argument("--min-positives", type=int, default=10)
    s.add_argument("--lock", default=None)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=_calibrate)

    s = ssub.add_parser("promote", help="the gate: paired comparison on the locked set; exit 0 promoted, 1 refused")
    s.add_argument("--candidate", required=True)
    s.add_argument("--deployed", required=True, help="checkpoint file or the registry folder (its current version)")
    s.add_argument("--labels", required=True)
    s.add_argument("--registry", required=True)
    s.add_argument("--margin", type=float, default=0.02, help="non-inferiority margin in AUROC (default 0.02)")
    s.add_argument("--min-positives", type=int, default=10, help="findings with fewer positives are not tested")
    s.add_argument("--lock", default=None)
    s.add_argument("--approver", default=None, help="who approves (default: the login name)")
    s.add_argument(
        "--no-original-data", action="store_true", help="skip the comparison on the original validation data"
    )
    s.add_argument("--dry-run", action="store_true", help="run the gate, change nothing")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=_promote)

    s = ssub.add_parser("rollback", help="make the previously current registry version current again")
    s.add_argument("--registry", required=True)
    s.add_argument("--approver", default=None)
    s.set_defaults(func=_rollback)

    s = ssub.add_parser(
        "monitor", help="per-day volume, OOD rate, positive rates, score drift (PSI), reviews; Prometheus textfile"
    )
    s.add_argument("--results", required=True, action="append")
    s.add_argument("--reviews", default=None)
    s.add_argument("--checkpoint", required=True, help="checkpoint file or registry folder")
    s.add_argument("--out", required=True)
    s.add_argument("--as-of", default=None, help="time given to rows seen for the first time (default now)")
    s.add_argument("--min-images", type=int, default=20, help="days with fewer images raise no alert")
    s.set_defaults(func=_monitor)


def _labels(args: argparse.Namespace) -> int:
    from medxray.site.labels import make_site_labels

    r = make_site_labels(
        args.reviews,
        args.results,
        args.out,
        secret=args.secret,
        lock_path=args.lock,
        lock_fraction=args.lock_fraction,
        lock_min_patients=args.lock_min_patients,
        val_fraction=args.val_fraction,
        adjudicators=args.adjudicator,
    )
    print(
        f"{r.images} labelled images of {r.patients} patients -> {r.files['labels']} "
        f"(splits {dict(sorted(r.splits.items()))})"
    )
    print(
        f"{r.conflicts} reviewer conflict(s) listed in {r.files['conflicts']}; {r.unmatched_reviews} verdict(s) "
        "matched no scored image"
    )
    print(r.lock_status)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from medxray.site.registry import current_checkpoint
    from medxray.site.validate import validate_site

    r = validate_site(
        current_checkpoint(args.checkpoint),
        args.labels,
        args.out,
        min_positives=args.min_positives,
        n_boot=args.bootstrap,
        device=args.device,
    )
    for w in r.worse:
        print(f"WORSE: {w}")
    if not r.worse:
        print("no finding significantly worse than in the checkpoint's validation")
    print(f"report: {r.files['html']} (and .md, .json, reliability.png)")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from medxray.site.calibrate import calibrate_site
    from medxray.site.registry import current_checkpoint

    prov = calibrate_site(
        current_checkpoint(args.checkpoint),
        args.labels,
        args.out,
        operating_point=args.operating_point,
        site=args.site,
        min_positives=args.min_positives,
        lock_path=args.lock,
        device=args.device,
    )
    for name, r in prov["findings"].items():
        if r["kept"]:
            print(f"{name:<20}{r['reason']}")
        else:
            lo, hi = r["threshold_ci95"]
            print(
                f"{name:<20}{r['old_threshold']:.3f} -> {r['threshold']:.3f} (95% CI {lo:.3f}-{hi:.3f}); "
                f"sensitivity {r['sensitivity']:.2f}, specificity {r['specificity']:.2f}"
            )
    print(
        f"wrote {args.out} ({prov['n_images']} images, {prov['n_studies']} studies; locked set excluded: "
        f"{prov['locked_images_excluded']} images)"
    )
    return 0


def _promote(args: argparse.Namespace) -> int:
    from medxray.site.promote import promote

    r = promote(
        args.candidate,
        args.deployed,
        args.labels,
        args.registry,
        margin=args.margin,
        min_positives=args.min_positives,
        lock_path=args.lock,
        approver=args.approver,
        original_data=not args.no_original_data,
        device=args.device,
        dry_run=args.dry_run,
    )
    lk = r.figures["locked"]
    print(
        f"locked set: {lk['images']} images; mean AUROC over {len(lk['tested'])} tested finding(s): deployed "
        f"{lk['mean_auc_a']:.3f}, candidate {lk['mean_auc_b']:.3f}"
    )
    for u in r.untested:
        print(f"not tested: {u}")
    print(f"gate report: {r.figures['report_dir']}/gate.json (comparison tables in locked/ and original/)")
    if not r.promoted:
        for reason in r.reasons:
            print(f"REFUSED: {reason}", file=sys.stderr)
        return 1
    if r.record:
        print(f"PROMOTED: {r.record['to']} is current in {args.registry} (approved by {r.record['approver']})")
    else:
        print("the gate passes (dry run: nothing changed)")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from medxray.site.registry import rollback

    rec = rollback(args.registry, approver=args.approver)
    print(f"rolled back: {rec['to']} is current again (was {rec['from']})")
    return 0


def _monitor(args: argparse.Namespace) -> int:
    from medxray.site.monitor import monitor

    r = monitor(
        args.results, args.checkpoint, args.out, reviews=args.reviews, as_of=args.as_of, min_images=args.min_images
    )
    last = max(r.days, default=None)
    today = [a for a in r.alerts if a.day == last]
    for a in today:
        print(f"{a.level.upper()}: {a.message}")
    print(f"{len(r.days)} day(s), {len(today)} alert(s) on {last}; {r.files['prom']} for the textfile collector")
    return 0
