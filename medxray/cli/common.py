"""What the command modules share: the parser class and the choices read from the library's tables.

An option with fixed choices takes them from the table that defines them (:class:`TableChoices`),
so a row added there is accepted and listed in ``--help`` without a CLI edit. Each loader here
imports its table only when argparse first needs it (to validate a typed value or to format a
subcommand's help), and every table lives in a module that imports no torch, monai or streamlit:
:mod:`medxray.mapmethods`, :mod:`medxray.backends` (its ``__init__``), :mod:`medxray.precision`,
:mod:`medxray.models.variants`, :mod:`medxray.data` (its ``__init__``) and :mod:`medxray.scoreoptions`
(tests/test_cli_choices.py checks it for every subcommand's help).
"""

from __future__ import annotations

import argparse
from typing import Callable, Iterable, Iterator, Sequence


class Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors already; keep its one-line message, no traceback."""


class TableChoices:
    """The keys of a library table (a dict or tuple), read when argparse first needs them.

    ``load`` returns the table; it imports its module lazily, so building the parser (and
    `medxray --help`) never imports torch: argparse reads the choices only to validate a value
    typed for the option or to format that subcommand's help. A row added to the table is
    accepted and listed without a CLI edit.
    """

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load = load

    def _keys(self) -> tuple[str, ...]:
        return tuple(self._load())

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, value: object) -> bool:
        return value in self._keys()

    def __repr__(self) -> str:  # names the table, not its rows (tests/test_cli_contract.py records it)
        return f"TableChoices({self._load.__name__})"


def add_table_option(parser: argparse.ArgumentParser, *flags: str, table: TableChoices, **kwargs) -> argparse.Action:
    """``parser.add_argument(*flags, **kwargs)`` with ``choices=table``.

    The choices are set on the returned action after ``add_argument``: argparse formats a
    metavar-less option once while adding it, which would read (and import) the table at build time.
    """
    action = parser.add_argument(*flags, **kwargs)
    action.choices = table
    return action


def _map_methods() -> Iterable[str]:
    from medxray.mapmethods import MAP_METHODS

    return MAP_METHODS


def _score_cam_methods() -> Iterable[str]:
    from medxray.scoreoptions import CAM_METHODS

    return CAM_METHODS


def _score_cam_modes() -> Sequence[str]:
    from medxray.scoreoptions import CAM_MODES

    return CAM_MODES


def _ood_policies() -> Sequence[str]:
    from medxray.scoreoptions import OOD_POLICIES

    return OOD_POLICIES


def _backends() -> Sequence[str]:
    from medxray.backends import BACKENDS

    return BACKENDS


def _predictor_precisions() -> Sequence[str]:
    from medxray.backends import PRECISIONS

    return PRECISIONS


def _precisions() -> Sequence[str]:
    from medxray.precision import PRECISIONS

    return PRECISIONS


def _architectures() -> Iterable[str]:
    from medxray.models.variants import VARIANTS

    return VARIANTS


def _datasets() -> Sequence[str]:
    from medxray.data import DATASETS

    return DATASETS


# Options with a fixed set of values take it from these tables (each read on first use).
MAP_METHOD_CHOICES = TableChoices(_map_methods)


SCORE_CAM_METHOD_CHOICES = TableChoices(_score_cam_methods)


SCORE_CAM_MODE_CHOICES = TableChoices(_score_cam_modes)


OOD_POLICY_CHOICES = TableChoices(_ood_policies)


BACKEND_CHOICES = TableChoices(_backends)


PREDICTOR_PRECISION_CHOICES = TableChoices(_predictor_precisions)


PRECISION_CHOICES = TableChoices(_precisions)


ARCHITECTURE_CHOICES = TableChoices(_architectures)


DATASET_CHOICES = TableChoices(_datasets)
