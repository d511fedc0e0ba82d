"""`medxray serve-dicom` and `medxray score-pacs`: the DICOM node beside a PACS and the Orthanc pull."""

from __future__ import annotations

import argparse


def add_pacs(sub: argparse._SubParsersAction) -> None:
    """Register `medxray serve-dicom` and `medxray score-pacs`."""
    p = sub.add_parser(
        "serve-dicom",
        help="run the DICOM node: C-STORE SCP in, score by series, results back to a PACS",
        description="Receives images by C-STORE, scores each series once it is idle with the "
        "score-dicom engine and C-STOREs an SR (+ CAM Secondary Captures) to the "
        "destination. Stop with Ctrl-C / SIGTERM; restart resumes. See pipelines/node.yaml.",
    )
    p.add_argument("--config", required=True, help="node YAML (AE title, port, allowed callers, destination, ...)")
    p.add_argument("--port", type=int, default=None, help="override the config's port")
    p.set_defaults(func=_run_serve_dicom)
    p = sub.add_parser(
        "score-pacs",
        help="pull new CR/DX images from Orthanc, score them, store results back",
        description="Reads Orthanc's change log after a cursor kept in --work, downloads new CR/DX "
        "instances, scores them with the score-dicom engine and POSTs the SR (+ SC) "
        "back. Re-run (e.g. from cron) to continue from the cursor.",
    )
    p.add_argument("--orthanc", required=True, metavar="URL", help="Orthanc REST URL, e.g. http://127.0.0.1:8042")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by `medxray finetune`")
    p.add_argument("--work", required=True, help="state folder (cursor, inbox, results.csv, outbox)")
    p.add_argument("--deidentified-sr", action="store_true", help="SR/SC with an empty patient module")
    p.add_argument("--no-sc", action="store_true", help="send the SR only, no CAM Secondary Captures")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=_run_score_pacs)


def _run_serve_dicom(args: argparse.Namespace) -> int:
    from medxray.pacs import load_node_config, serve

    serve(load_node_config(args.config, {"port": args.port} if args.port else None))
    return 0


def _run_score_pacs(args: argparse.Namespace) -> int:
    from medxray.pacs import ResultPolicy, score_pacs

    policy = ResultPolicy(
        deidentified_sr=args.deidentified_sr,
        secondary_capture=not args.no_sc,
        scoring={"batch_size": args.batch_size, "workers": args.workers},
    )
    summary = score_pacs(args.orthanc, args.checkpoint, args.work, policy=policy)
    print(summary.line())
    return 0 if not summary.queued_left else 1
