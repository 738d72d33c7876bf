"""Where every artifact of a fleet lives, relative to the project root.

    data/prepared/<dataset>/{train,val,test}.npz, meta.json
    models/<model>/{teacher,student,pruned}.keras
    models/<model>/variants/<mode>.tflite
    metrics/<model>.json
    reports/fleet.md
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    """The artifact layout under one project root (the folder holding dvc.yaml)."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    def prepared(self, dataset: str) -> Path:
        return self.root / "data" / "prepared" / dataset

    def model_dir(self, model: str) -> Path:
        return self.root / "models" / model

    def keras(self, model: str, variant: str) -> Path:
        return self.model_dir(model) / f"{variant}.keras"

    def variants_dir(self, model: str) -> Path:
        return self.model_dir(model) / "variants"

    def tflite(self, model: str, mode: str) -> Path:
        return self.variants_dir(model) / f"{mode}.tflite"

    def metrics(self, model: str) -> Path:
        return self.root / "metrics" / f"{model}.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"
