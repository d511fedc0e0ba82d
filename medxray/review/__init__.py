"""The clinician review app's logic: review storage and everything the Streamlit pages show.

Modules, one concern each:

- :mod:`~medxray.review.store`: :class:`ReviewStore` (SQLite, one transaction per save),
  :class:`ImageKey`, :class:`Review`, CSV export.
- :mod:`~medxray.review.settings`: :class:`AppSettings` and its environment variables, the
  fail-fast check, the ``streamlit run`` command, standing texts.
- :mod:`~medxray.review.study`: one image (upload or scored file), display, predictions, warnings.
- :mod:`~medxray.review.viewing`: window/level presets, invert, zoom and pan, the CAM overlay view.
- :mod:`~medxray.review.worklist`: a ``score-dicom`` results folder as a filterable worklist.
- :mod:`~medxray.review.model_card`: the model card from checkpoint metadata.
- :mod:`~medxray.review.safe`: what the app reads from files is data: paths kept under their root
  (:func:`~medxray.review.safe.contained_path`) and text shown as text (:func:`~medxray.review.safe.md_escape`).
- :mod:`~medxray.review.session_keys`: every session-state and widget key of the app (typed key
  objects; no key is typed by hand).
- :mod:`~medxray.review.ui`: the Streamlit caches, notices, identity and results-folder widgets the
  pages in ``app/`` use; :mod:`~medxray.review.ui_study`: the Study page's widgets and keyboard flow.

Only :mod:`~medxray.review.ui` and :mod:`~medxray.review.ui_study` import streamlit; this
package's ``__init__`` imports the store alone, so ``from medxray.review import ReviewStore`` stays light.
"""

from medxray.review.store import EXPORT_COLUMNS, FindingVerdict, ImageKey, Review, ReviewError, ReviewStore

__all__ = ["EXPORT_COLUMNS", "FindingVerdict", "ImageKey", "Review", "ReviewError", "ReviewStore"]
