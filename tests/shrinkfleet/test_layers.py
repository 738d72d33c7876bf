"""Arrows point down: the command line and the flows import the core; the core imports neither, nor Prefect."""

from __future__ import annotations

import ast

from tests.conftest import REPO

FORBIDDEN = ("prefect", "prefect_dask", "flows", "tasks", "shrinkfleet.cli")


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _hits(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))


def test_no_core_module_imports_prefect_the_flows_the_tasks_or_the_command_line():
    core = [p for p in (REPO / "shrinkfleet").glob("*.py")]
    assert len(core) > 20
    found = {p.name: hits for p in core if (hits := _hits(_imports(p)))}
    assert found == {}


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    sneaky = tmp_path / "m.py"
    sneaky.write_text("def f():\n    from flows.fleet import fleet_flow\n    import prefect.main\n")
    assert _hits(_imports(sneaky)) == ["flows.fleet", "flows.fleet.fleet_flow", "prefect.main"]


def test_the_command_line_is_a_package_of_its_own():
    assert (REPO / "shrinkfleet" / "cli" / "__init__.py").is_file() and not (REPO / "shrinkfleet" / "cli.py").exists()
