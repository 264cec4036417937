"""The planted-mutant list of ``tools/mutants.py`` stays runnable: every snippet matches its file exactly
once and every test it names exists. Cheap (no pytest run); ``make mutants`` runs the mutants themselves."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ril_mutants", ROOT / "tools" / "mutants.py")
mutants = sys.modules["ril_mutants"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutants)


@pytest.mark.parametrize("m", mutants.MUTANTS, ids=lambda m: m.id)
def test_mutant_is_well_formed(m):
    text = mutants.check(m)  # the snippet occurs exactly once
    assert m.replacement != m.snippet and m.tests and m.what
    compile(text.replace(m.snippet, m.replacement, 1), m.file, "exec")  # still Python
    for node in m.tests:
        path, _, name = node.partition("::")
        assert name and (ROOT / path).is_file(), node
        assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(encoding="utf-8"), re.M), node


def test_ids_are_unique_and_snippets_are_checked():
    assert len({m.id for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    bad = mutants.Mutant("x", "ril_fast/config.py", "no such text anywhere", "y", ("t",), "w")
    with pytest.raises(mutants.SnippetError, match="occurs 0 times"):
        mutants.check(bad)
    twice = mutants.Mutant("x", "ril_fast/config.py", "def ", "y", ("t",), "w")
    with pytest.raises(mutants.SnippetError, match="must be exactly once"):
        mutants.check(twice)
