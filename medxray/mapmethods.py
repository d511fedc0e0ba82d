"""The table of class-activation-map methods (torch-free, so the CLI can list it without torch).

:data:`MAP_METHODS` maps a method name to its :class:`MapMethod` row; :mod:`medxray.cam` computes
the maps and re-exports these names. Sources: CAM (Zhou et al., CVPR 2016), Grad-CAM (Selvaraju
et al., ICCV 2017), LayerCAM (Jiang et al., IEEE TIP 2021). Which method is the default was
measured on the phantom (``bench/localisation.py``, README).

This module imports nothing of medxray but :mod:`medxray.errors` (tests/test_import_graph.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from medxray.errors import ConfigError


@dataclass(frozen=True)
class MapMethod:
    """One row of the method table: ``kind`` is cam / gradcam / layercam; ``stages`` are
    ``model.features`` children whose outputs the map is computed on."""

    kind: str
    stages: tuple[str, ...] = ()
    description: str = ""


MAP_METHODS: dict[str, MapMethod] = {
    "cam": MapMethod("cam", (), "CAM on the last feature map (Zhou et al. 2016)"),
    "gradcam-denseblock4": MapMethod("gradcam", ("denseblock4",), "Grad-CAM at denseblock4 (Selvaraju et al. 2017)"),
    "gradcam-denseblock3": MapMethod("gradcam", ("denseblock3",), "Grad-CAM at denseblock3, 2x finer"),
    "gradcam-denseblock2": MapMethod("gradcam", ("denseblock2",), "Grad-CAM at denseblock2, 4x finer"),
    "layercam-denseblock2": MapMethod("layercam", ("denseblock2",), "LayerCAM at denseblock2, 4x finer"),
    "layercam-denseblock1": MapMethod("layercam", ("denseblock1",), "LayerCAM at denseblock1, 8x finer"),
    "layercam-denseblock3": MapMethod("layercam", ("denseblock3",), "LayerCAM at denseblock3 (Jiang et al. 2021)"),
    "layercam": MapMethod(
        "layercam",
        ("denseblock2", "denseblock3", "denseblock4"),
        "LayerCAM fused over denseblock2-4 (Jiang et al. 2021)",
    ),
}
DEFAULT_MAP_METHOD = "layercam-denseblock1"  # measured best on the phantom: see bench/localisation.py, README


def check_method(method: str | None) -> str:
    """The method name, or :data:`DEFAULT_MAP_METHOD` for None / "" / "default".

    Raises :class:`~medxray.errors.ConfigError` (a ValueError) for a name not in :data:`MAP_METHODS`.
    """
    name = DEFAULT_MAP_METHOD if method in (None, "", "default") else str(method)
    if name not in MAP_METHODS:
        raise ConfigError(f"unknown CAM method {name!r}; choose one of {', '.join(MAP_METHODS)}")
    return name


__all__ = ["DEFAULT_MAP_METHOD", "MAP_METHODS", "MapMethod", "check_method"]
