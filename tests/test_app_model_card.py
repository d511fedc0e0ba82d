"""The model card from checkpoint metadata: summary, thresholds, metrics with intervals, localisation."""

from __future__ import annotations

import numpy as np

from medxray.review.model_card import metrics_overview, metrics_table, model_card


def test_metrics_table_reads_several_layouts():
    m = metrics_table(
        {
            "test": {
                "auroc": {"Mass": 0.8, "Edema": 0.9},
                "auroc_ci": {"Mass": [0.7, 0.88]},
                "mean_auroc": 0.85,
                "mean_auroc_ci": [0.8, 0.9],
            },
            "val": {"auprc": {"Mass": {"value": 0.4, "ci_low": 0.3, "ci_high": 0.5}}},
        }
    )
    rows = {(r.scope, r.finding, r.metric): (r.value, r.ci_low, r.ci_high) for r in m.itertuples()}
    assert rows[("test", "Mass", "auroc")] == (0.8, 0.7, 0.88)
    assert rows[("test", "Edema", "auroc")][0] == 0.9 and np.isnan(rows[("test", "Edema", "auroc")][1])
    assert rows[("test", "(overall)", "mean_auroc")] == (0.85, 0.8, 0.9)
    assert rows[("val", "Mass", "auprc")] == (0.4, 0.3, 0.5)
    overall, per = metrics_overview(m)
    assert dict(zip(overall["metric"], overall["value (95% CI)"])) == {"test/mean_auroc": "0.850 (0.800-0.900)"}
    per = per.set_index("finding")
    assert per.loc["Mass", "test/auroc"] == "0.800 (0.700-0.880)" and per.loc["Edema", "test/auroc"] == "0.900"
    assert per.loc["Mass", "val/auprc"] == "0.400 (0.300-0.500)"


def test_model_card_from_metadata():
    from medxray.data.transforms import preprocessing_config

    meta = {
        "architecture": "densenet121",
        "label_names": ["Mass", "Edema"],
        "pretrained": "imagenet",
        "preprocessing": preprocessing_config(224),
        "thresholds": {"Mass": 0.3},
        "dataset": "chestxray14",
        "metrics": {"test": {"auroc": {"Mass": 0.8}}},
        "model_version": "v1",
        "versions": {"torch": "2.x"},
    }
    card = model_card(meta, checkpoint_path="/x/c.pt")
    s = dict(zip(card.summary["field"], card.summary["value"]))
    assert s["architecture"] == "densenet121" and s["initialisation"] == "imagenet"
    assert dict(zip(card.training["field"], card.training["value"]))["dataset"] == "chestxray14"
    assert dict(zip(card.thresholds["finding"], card.thresholds["threshold"])) == {"Mass": 0.3, "Edema": 0.5}
    assert len(card.metrics) == 1 and "not for clinical use" in card.not_for_clinical_use
    bare = model_card({"architecture": "x", "label_names": []})
    assert any("records no evaluation metrics" in x for x in bare.limitations)
    names = model_card({"architecture": "x", "label_names": ["Pleural_Thickening"]}).thresholds["finding"]
    assert list(names) == ["Pleural thickening"]


def test_model_card_localisation_per_finding_or_not_measured():
    from medxray.review.model_card import NOT_MEASURED, localisation_table

    meta = {
        "label_names": ["Mass", "Edema", "Pleural_Thickening"],
        "metrics": {"test_auroc": {"Mass": 0.91, "Edema": 0.8}},
        "localisation": {
            "method": "gradcam-denseblock3",
            "split": "test",
            "source": "real",
            "per_finding": {
                "Mass": {
                    "n_boxes": 85,
                    "pointing_game": 0.42,
                    "mean_iobb": 0.3,
                    "iobb_accuracy": {"0.1": 0.7, "0.25": 0.5, "0.5": 0.2},
                }
            },
        },
    }
    table, note = localisation_table(meta)
    rows = table.set_index("finding")
    assert rows.loc["Mass"].to_dict() == {
        "AUROC": "0.910",
        "pointing game": "0.42",
        "IoBB>0.1": "0.70",
        "IoBB>0.25": "0.50",
        "IoBB>0.5": "0.20",
        "boxes": "85",
        "data": "real",
    }
    assert rows.loc["Edema", "AUROC"] == "0.800" and rows.loc["Edema", "pointing game"] == NOT_MEASURED
    assert rows.loc["Pleural thickening", "AUROC"] == "not evaluated"
    assert "gradcam-denseblock3" in note and "test" in note
    _, none_note = localisation_table({"label_names": ["Mass"]})
    assert "not measured" in none_note.lower()
    phantom = {**meta, "localisation": {**meta["localisation"], "source": "phantom"}}
    assert "phantom" in localisation_table(phantom)[1] and localisation_table(phantom)[0]["data"][0] == "phantom"
