"""The mutation suite (tests/mutants): its table is sound, and a subset runs on every test run.

The whole suite (every mutation at the smoke and quick presets' sizes, with an
unmutated run of each cell) is ``nox -s mutants``; here one mutation per
framework runs at smoke sizes through the real cell path, after its unmutated
cell passed the gate.
"""

import io
import os
from dataclasses import replace

import pytest

from bench import registry
from conftest import SELECTED
from mutants import driver
from mutants.table import MUTATIONS, REQUIRED_KINDS, SUBSET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = [f for f in os.environ.get("BENCH_REQUIRE_FRAMEWORKS", "").split(",") if f]
PACKAGE = {"tensorflow": "tf"}


def test_table_covers_what_the_issue_asks():
    names = [m.name for m in MUTATIONS]
    assert len(names) >= 15 and len(set(names)) == len(names)
    for fw in ("torch", "jax", "tensorflow"):
        assert sum(m.framework == fw for m in MUTATIONS) >= 3, fw
    assert set(REQUIRED_KINDS) <= {m.kind for m in MUTATIONS}
    assert set(SUBSET) <= set(names)
    assert sorted(MUTATIONS[names.index(n)].framework for n in SUBSET) == ["jax", "tensorflow",
                                                                           "torch"]
    entries = set(registry.entries())
    for m in MUTATIONS:
        for cell in m.cells:
            fw, model, strategy = cell.split("/")
            assert (fw, model, strategy) in entries, cell
            # the bug lives in the code that cell runs
            assert m.file.startswith("impls/%s_impl/" % PACKAGE.get(fw, fw)), (m.name, m.file)


def test_every_anchor_is_in_the_code_exactly_once():
    """A refactor that moves mutated code fails here, instead of silently disabling a mutation."""
    for m in MUTATIONS:
        with open(os.path.join(ROOT, m.file), encoding="utf-8") as fh:
            text = fh.read()
        assert text.count(m.old) == 1, "%s: anchor found %d times in %s" % (
            m.name, text.count(m.old), m.file)
        assert m.new != m.old and m.new not in text, m.name


def test_apply_changes_only_the_copy_and_refuses_a_missing_anchor(tmp_path):
    m = MUTATIONS[0]
    original = open(os.path.join(ROOT, m.file), encoding="utf-8").read()
    tree = driver.copy_tree(str(tmp_path / "copy"))
    driver.apply(m, tree)
    mutated = open(os.path.join(tree, m.file), encoding="utf-8").read()
    assert m.new in mutated and m.old not in mutated
    assert open(os.path.join(ROOT, m.file), encoding="utf-8").read() == original
    with pytest.raises(driver.MutationError, match="found 0 times"):
        driver.apply(replace(m, old="text that is nowhere"), tree)
    with pytest.raises(driver.MutationError, match="found 0 times"):
        driver.apply(m, tree)   # already applied: the anchor is gone


@pytest.mark.parametrize("name", SUBSET)
def test_gate_catches_the_mutation_at_smoke_sizes(name):
    m = next(x for x in MUTATIONS if x.name == name)
    if m.framework not in SELECTED:
        pytest.skip("%s is not among this session's frameworks" % m.framework)
    ok, why = registry.probe(m.framework)
    if not ok:
        if m.framework in REQUIRED:
            pytest.fail("required framework %s is unavailable: %s" % (m.framework, why))
        pytest.skip(why)
    rows = driver.run([m], ["smoke"], out=io.StringIO())
    base = [r for r in rows if r["mutation"] == "(none)"]
    mutant = [r for r in rows if r["mutation"] == name]
    assert base and all(r["ok"] for r in base), base
    assert mutant and all(r["ok"] for r in mutant), mutant
    assert all(r["reason"].startswith("not equivalent") for r in mutant)
