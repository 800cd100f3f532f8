"""The mutation check (tests/mutations.py) stays runnable: every mutation still applies to today's code."""

import pytest

from tests.mutations import MUTATIONS, ROOT


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_mutation_applies_to_todays_code(mutation):
    text = (ROOT / mutation.path).read_text(encoding="utf-8")
    for old, _ in mutation.edits:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {mutation.path}"
    files = [arg for arg in mutation.tests if arg.startswith("tests/")]
    assert files and all((ROOT / f).is_file() for f in files), mutation.tests
