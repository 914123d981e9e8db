"""The README and the benchmark write-ups back their claims by naming tests, and show code by naming dataflex's
modules and functions: every test they name exists, every dataflex name they give resolves, every import
line they show runs."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `test_file::test_name` (optionally `tests/…py` and a parameter id), and the shortened `…test_name` that follows one
FULL = re.compile(r"`(?:tests/)?(test_\w+)(?:\.py)?::(\w+)(?:\[[^\]`]*\])?`")
SHORT = re.compile(r"`…(test_\w+)(?:\[[^\]`]*\])?`")
# `dataflex.module.name` anywhere in backticks (also `python -m dataflex.recipes.x ...`), and import lines of code
DOTTED = re.compile(r"`(?:python -m )?(dataflex(?:\.\w+)+)")
IMPORT = re.compile(r"^\s*(from dataflex[\w.]* import [\w, ()]+)$", re.MULTILINE)
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "benchmarks").rglob("*.md"))]


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
    named, missing = 0, []
    for doc in DOCUMENTS:
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


def resolves(dotted: str) -> bool:
    """Whether ``a.b.c`` is a module, or an attribute chain below the longest importable module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False


def test_every_dataflex_name_and_import_the_docs_show_is_real():
    """A reader copies `dataflex.offline.write_subset` or a quick start's import lines: each must exist as written
    (checked by renaming one: `dataflex.offline.write_subsets` and `from dataflex.selectors import LossFocuss` fail)."""
    names, imports, missing = set(), set(), []
    for doc in DOCUMENTS:
        text = doc.read_text(encoding="utf-8")
        names |= {(doc.name, name) for name in DOTTED.findall(text)}
        imports |= {(doc.name, line.strip()) for line in IMPORT.findall(text)}
    missing += [f"{doc}: `{name}`" for doc, name in sorted(names) if not resolves(name)]
    for doc, line in sorted(imports):
        try:
            exec(compile(line, doc, "exec"), {})
        except ImportError as error:
            missing.append(f"{doc}: {line} ({error})")
    assert len(names) > 20 and len(imports) > 5, f"{len(names)} names, {len(imports)} imports: has the format changed?"
    assert not missing, "the docs show names that do not exist: " + "; ".join(missing)
    assert not resolves("dataflex.offline.write_subsets") and resolves("dataflex.offline.write_subset")
