"""The generated parts of docs/ are current: the parameter reference and the benchmark table."""

from __future__ import annotations

import subprocess
import sys

from shrinkfleet import reference
from tests.conftest import REPO


def _block(text: str, start: str, end: str) -> str:
    assert start in text and end in text, f"markers {start} ... {end} missing"
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def test_the_parameter_reference_is_current():
    page = (REPO / "docs" / "configuration.md").read_text()
    assert _block(page, reference.START, reference.END) == reference.render().strip(), (
        "docs/configuration.md is stale: run `make docs` (python -m shrinkfleet.reference)")


def test_the_reference_covers_every_field_of_every_schema_class():
    text = reference.render()
    for cls in reference.schema_classes():
        assert f"### {cls.__name__}\n" in text
        for name, field in cls.model_fields.items():
            assert f"| `{field.alias or name}` |" in text
    assert {c.__name__ for c in reference.schema_classes()} >= {"FleetConfig", "GateConfig", "ModelSpec",
                                                                "FeatureConfig", "CustomArch", "ImagesDataset"}


def test_the_check_fails_on_a_stale_page(tmp_path):
    page = tmp_path / "configuration.md"
    page.write_text((REPO / "docs" / "configuration.md").read_text().replace("Adam learning rate.", "Adam rate."))
    assert reference.main(["--check", "--file", str(page)]) == 1
    assert reference.main(["--file", str(page)]) == 0
    assert reference.main(["--check", "--file", str(page)]) == 0


def test_the_generator_imports_no_prefect_and_no_tensorflow():
    code = ("import sys, shrinkfleet.reference as r; r.render(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'tensorflow', 'tf_keras', 'mlflow', "
            "'dvc', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
