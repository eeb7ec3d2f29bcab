"""The tracking-schema table of docs/schema.md lists exactly the names harness/schema.py defines."""
import re

from conftest import ROOT

from harness import schema

KINDS = {"param": "params", "metric": "metrics", "artifact": "artifacts", "tag": "tags", "attr": "attrs",
         "trial param": "trial params", "alias": "aliases"}


def documented_table() -> dict[str, set[str]]:
    text = (ROOT / "docs" / "schema.md").read_text()
    found: dict[str, set[str]] = {kind: set() for kind in KINDS.values()}
    for kind, name in re.findall(r"^\| ([a-z ]+) \| `([^`]+)` \|", text, flags=re.M):
        assert kind in KINDS, f"docs/schema.md row of unknown kind {kind!r}"
        found[KINDS[kind]].add(name)
    return found


def test_the_docs_list_every_name_of_the_schema_and_no_other():
    documented, defined = documented_table(), schema.names()
    assert sum(map(len, documented.values())) > 40
    for kind in KINDS.values():
        assert documented[kind] == defined[kind], (kind, "docs only:", documented[kind] - defined[kind],
                                                   "schema only:", defined[kind] - documented[kind])


def test_templates_fill_as_documented():
    assert schema.final("test_loss") == schema.FINAL_TEST_LOSS
    assert schema.best(schema.FINAL_TEST_LOSS) == "best_final_test_loss"
    assert schema.best_param("lr") == "best.lr" and schema.error("weight") == "weight_error"


def test_no_module_spells_a_schema_name_itself():
    """A name of the schema written as a string literal anywhere else in harness/ would be a second
    definition (ordinary words that happen to be names, like "experiment", are not in the schema)."""
    names = {n for kind in schema.names().values() for n in kind if "{" not in n}
    offenders = []
    for path in (ROOT / "harness").rglob("*.py"):
        if path.name == "schema.py":
            continue
        for literal in re.findall(r"""(?<![\\w.])["']([A-Za-z_.]+)["']""", path.read_text()):
            if literal in names:
                offenders.append(f"{path.relative_to(ROOT)}: {literal!r}")
    assert not offenders, offenders
