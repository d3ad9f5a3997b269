"""docs/ARCHITECTURE.md names every module of the package (its module index)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "spinegrade"


def test_every_module_has_a_line_in_the_module_index():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    index = doc.split("## Module index", 1)[1].split("\n## ", 1)[0]
    listed = {line.split("`")[1] for line in index.splitlines() if line.startswith("| `")}
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    assert modules - listed == set(), "add these modules to the module index"
    assert listed - modules == set(), "these listed modules do not exist any more"
