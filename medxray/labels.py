"""Finding names, defined once.

ChestX-ray14's 14 findings in CheXNet's order (Rajpurkar et al. 2017), which is also the
order of the per-class reference table in DESIGN.md and of every model head we train on it.
"""

from __future__ import annotations

CHESTXRAY14_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)


def display_name(finding: str) -> str:
    """A finding's name as people read it: ``"Pleural_Thickening"`` -> ``"Pleural thickening"``.

    Only for what a person sees (tables, headers, labels); files, CSV columns and checkpoints keep
    the dataset's names. Underscores become spaces and words after the first are lower-cased.
    """
    words = str(finding).replace("_", " ").split()
    if not words:
        return str(finding)
    return " ".join([words[0][:1].upper() + words[0][1:]] + [w.lower() if not w.isupper() else w for w in words[1:]])


# Published per-class AUROC on ChestX-ray14 that reports compare against.
CHEXNET_AUROC: dict[str, float] = {
    "Atelectasis": 0.8094,
    "Cardiomegaly": 0.9248,
    "Effusion": 0.8638,
    "Infiltration": 0.7345,
    "Mass": 0.8676,
    "Nodule": 0.7802,
    "Pneumonia": 0.7680,
    "Pneumothorax": 0.8887,
    "Consolidation": 0.7901,
    "Edema": 0.8878,
    "Emphysema": 0.9371,
    "Fibrosis": 0.8047,
    "Pleural_Thickening": 0.8062,
    "Hernia": 0.9164,
}
WANG2017_AUROC: dict[str, float] = {
    "Atelectasis": 0.7003,
    "Cardiomegaly": 0.8100,
    "Effusion": 0.7585,
    "Infiltration": 0.6614,
    "Mass": 0.6933,
    "Nodule": 0.6687,
    "Pneumonia": 0.6580,
    "Pneumothorax": 0.7993,
    "Consolidation": 0.7032,
    "Edema": 0.8052,
    "Emphysema": 0.8330,
    "Fibrosis": 0.7859,
    "Pleural_Thickening": 0.6835,
    "Hernia": 0.8717,
}
