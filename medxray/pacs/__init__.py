"""The DICOM network node: medxray next to a PACS (network concerns only; file-level DICOM is medxray.dicom).

* :mod:`medxray.pacs.config`: :class:`NodeConfig` from ``node.yaml`` and its checks;
* :mod:`medxray.pacs.spool`: the on-disk state (incoming, inbox, scored, outbox, ledgers);
* :mod:`medxray.pacs.scp`: the pynetdicom C-STORE / C-ECHO SCP;
* :mod:`medxray.pacs.results`: scoring the inbox with the batch engine, result objects into the outbox;
* :mod:`medxray.pacs.sender`: C-STORE / Orthanc REST sending with retry and back-off;
* :mod:`medxray.pacs.node`: ``serve-dicom``'s main loop; :mod:`medxray.pacs.pull`: ``score-pacs``.

Nothing in medxray.dicom, medxray.scoring or the app may import this package.
"""

from medxray.pacs.config import Destination, NodeConfig, load_node_config, node_config_from_mapping
from medxray.pacs.node import serve
from medxray.pacs.pull import PullSummary, score_pacs
from medxray.pacs.results import ResultPolicy

__all__ = [
    "Destination",
    "NodeConfig",
    "PullSummary",
    "ResultPolicy",
    "load_node_config",
    "node_config_from_mapping",
    "score_pacs",
    "serve",
]
