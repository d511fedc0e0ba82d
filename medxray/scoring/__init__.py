"""Batch DICOM scoring: a folder of files in, exactly one result row per file out, nothing lost.

The engine behind ``medxray score-dicom`` and ``pipelines/score_dicom.py``:

1. walk INPUT recursively (directory symlinks are followed once per real directory, so a link
   loop cannot recurse; FIFOs and devices are never opened; the output folder is skipped);
2. decode in worker processes (:func:`medxray.dicom.read_dicom` + THE deterministic transforms),
   overlapped with batched inference in the main process (:class:`medxray.inference.Predictor`);
3. CAM overlays and DICOM SR documents are written by the same workers, atomically;
4. a row is appended to ``OUT/results.csv`` and flushed as soon as its file (and its overlays /
   SR) is complete. A kill at any moment loses at most rows not yet flushed; a re-run with the
   same arguments drops any half-written last line, skips files that have a row and appends the
   rest. At the end the file is rewritten sorted by path, so an interrupted + resumed run ends
   byte-for-byte like an uninterrupted one (up to reduced-precision noise in the last digit when
   batches were composed differently).

Outputs never carry patient names, IDs or birth dates: rows hold UIDs, modality and view only,
and SR documents are built from an allow-listed reference with an empty patient module.

Modules (each imports only those above it):

* :mod:`~medxray.scoring.discovery`: walking the input, ``k/n`` shards, per-file output names;
* :mod:`~medxray.scoring.scheduler`: ``--shard auto`` from SLURM / Kubernetes, the job recipes (``--emit``);
* :mod:`~medxray.scoring.journal`: results.csv columns, :class:`ResultsJournal`, :func:`read_results`;
* :mod:`~medxray.scoring.messages`: the typed messages between the worker processes and the engine;
* :mod:`~medxray.scoring.config`: :class:`ScoreConfig`, :func:`load_score_config`, :class:`ScoreSummary`;
* :mod:`~medxray.scoring.workers`: the decode pool and the jobs run in it (decode, CAM/SR outputs);
* :mod:`~medxray.scoring.engine`: :class:`ScoringEngine`, pool + batched inference + crash isolation;
* :mod:`~medxray.scoring.run`: :func:`score_directory`, one locked, resumable, shardable run, and
  :func:`~medxray.scoring.run.merge_run`, the merge step of a sharded run (``score-dicom --merge``).

This package must not import the app, the review store or a network node (they import it).
"""

from medxray.scoring.config import (
    CAM_METHODS,
    CAM_MODES,
    ScoreConfig,
    ScoreSummary,
    default_threads,
    default_workers,
    load_score_config,
)
from medxray.scoring.discovery import in_shard, iter_input_files, output_stem, parse_shard
from medxray.scoring.engine import ScoringEngine, WorkItem
from medxray.scoring.journal import RESULT_COLUMNS, RESULTS_NAME, ResultsJournal, read_results, result_columns
from medxray.scoring.messages import DecodedImage, DecodeFailure, PostResult, PostTask, SRRequest
from medxray.scoring.run import RUN_NAME, score_directory
from medxray.scoring.workers import CAMS_DIR, SR_DIR, decode_job, new_decode_pool, post_job

__all__ = [
    "CAMS_DIR",
    "CAM_METHODS",
    "CAM_MODES",
    "DecodeFailure",
    "DecodedImage",
    "RESULTS_NAME",
    "RESULT_COLUMNS",
    "RUN_NAME",
    "PostResult",
    "PostTask",
    "SRRequest",
    "SR_DIR",
    "ResultsJournal",
    "ScoreConfig",
    "ScoreSummary",
    "ScoringEngine",
    "WorkItem",
    "decode_job",
    "default_threads",
    "default_workers",
    "in_shard",
    "iter_input_files",
    "load_score_config",
    "new_decode_pool",
    "output_stem",
    "parse_shard",
    "post_job",
    "read_results",
    "result_columns",
    "score_directory",
]
