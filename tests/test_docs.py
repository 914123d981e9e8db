"""The README and the benchmark write-ups back their claims by naming tests; every test they name exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `test_file::test_name` (optionally `tests/…py` and a parameter id), and the shortened `…test_name` that follows one
FULL = re.compile(r"`(?:tests/)?(test_\w+)(?:\.py)?::(\w+)(?:\[[^\]`]*\])?`")
SHORT = re.compile(r"`…(test_\w+)(?:\[[^\]`]*\])?`")


def defined_tests() -> dict[str, set[str]]:
    """Function and class names defined in each test module (collected tests and their helpers)."""
    return {
        path.stem: {
            node.name
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.FunctionDef | ast.ClassDef)
        }
        for path in (ROOT / "tests").glob("test_*.py")
    }


def test_every_test_the_docs_name_exists():
    defined = defined_tests()
    anywhere = set().union(*defined.values())
    documents = [ROOT / "README.md", *sorted((ROOT / "benchmarks").rglob("*.md"))]
    named, missing = 0, []
    for doc in documents:
        text = doc.read_text(encoding="utf-8")
        for module, name in FULL.findall(text):
            named += 1
            if name not in defined.get(module, set()):
                missing.append(f"{doc.relative_to(ROOT)}: {module}::{name}")
        for name in SHORT.findall(text):
            named += 1
            if name not in anywhere:
                missing.append(f"{doc.relative_to(ROOT)}: …{name}")
    assert named > 50, f"only {named} test names found in the docs: has the way they are written changed?"
    assert not missing, "the docs name tests that do not exist: " + "; ".join(missing)
