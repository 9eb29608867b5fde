"""The layers of docs/architecture.md, checked in the source: the engine
imports nothing of the BAM layer, the presets or the BAM kernels; the BAM
layer imports nothing of the presets; the line kernel cimports nothing of
the BAM record layer."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "bamflow"
ENGINE_KERNELS = {"bamflow.kernels.lines", "bamflow.kernels._io", "bamflow.kernels._posixio"}


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a Python file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def cython_imports(path: pathlib.Path) -> set[str]:
    text = path.read_text()
    return set(re.findall(r"^\s*from\s+([\w.]+)\s+c?import", text, re.M)) | set(
        re.findall(r"^\s*c?import\s+([\w.]+)", text, re.M)
    )


def is_bam_or_presets(module: str) -> bool:
    if module.startswith(("bamflow.bam", "bamflow.presets", "bamflow.parts")):
        return True
    return module.startswith("bamflow.kernels") and not any(
        module == k or module.startswith(k + ".") for k in ENGINE_KERNELS
    ) and module != "bamflow.kernels"


@pytest.mark.parametrize("path", sorted((ROOT / "engine").glob("*.py")), ids=lambda p: p.name)
def test_engine_imports_nothing_of_bam(path):
    bad = sorted(m for m in imported_modules(path) if is_bam_or_presets(m))
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("name", ["lines.pyx", "lines.pyi", "_io.pyx", "_io.pxd", "_posixio.pxd"])
def test_engine_kernels_cimport_nothing_of_bam(name):
    path = ROOT / "kernels" / name
    bad = sorted(m for m in cython_imports(path) if is_bam_or_presets(m))
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("path", sorted((ROOT / "bam").glob("*.py")), ids=lambda p: p.name)
def test_bam_layer_imports_no_presets(path):
    bad = sorted(m for m in imported_modules(path) if m.startswith("bamflow.presets"))
    assert not bad, f"{path.name} imports {bad}"


def test_the_checks_see_imports():
    """The scanner itself: a BAM-layer module does import the engine and the kernels."""
    found = imported_modules(ROOT / "bam" / "workflow.py")
    assert "bamflow.engine.workflow" in found and "bamflow.bam.stages" in found
    assert is_bam_or_presets("bamflow.kernels.bam") and not is_bam_or_presets("bamflow.kernels.lines")


@pytest.mark.parametrize("path", sorted([*(ROOT / "bam").glob("*.py"), *(ROOT / "presets").glob("*.py")]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_bam_layer_and_presets_import_nothing_distributed(path):
    """bamflow.distributed sits above both: what they share with it (partitions) lives in the BAM layer."""
    bad = sorted(m for m in imported_modules(path) if m.startswith("bamflow.distributed"))
    assert not bad, f"{path.name} imports {bad}"
