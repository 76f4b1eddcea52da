"""The README's node table is what the pack registers: ids, names, category, inputs, outputs.

Workflows, scripts and users' saved graphs refer to nodes by id, so an id must never change; the
table is how users find them. Read from the nodes' own V3 schemas, loaded in-process the way
ComfyUI's loader does (the server test checks /object_info serves the same nodes). Nodes added
later only have to be in the table and the category to pass.
"""

import asyncio
import re

import pytest
from harness.host import REPO_ROOT
from harness.pack import load_pack

CATEGORY = "PVA face inpainting"
# The nodes the README has promised since the first release, by id: renaming one breaks saved graphs.
PROMISED = {
    "PVAFaceNetLoader": "Load FaceNet (PVA)",
    "PVAModelLoader": "Load PVA Model",
    "PVAInitializeFromModel": "Initialize PVA Model from MODEL",
    "PVAEncodeIdentity": "Encode Identity (PVA)",
    "PVAApply": "Apply PVA Identity",
    "PVAQuickPersonalize": "Quick Personalize (PVA)",
    "PVASaveModel": "Save PVA Model",
}


@pytest.fixture(scope="module")
def schemas() -> dict:
    extension = asyncio.run(load_pack().comfy_entrypoint())
    return {node.GET_SCHEMA().node_id: node.GET_SCHEMA() for node in asyncio.run(extension.get_node_list())}


def readme_node_rows() -> list[dict]:
    """The rows of the README's "## Nodes" table."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("\n## Nodes\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        match = re.match(r"\| (.+?) `(\w+)` \| (.*?) \| (.*?) \|", line)
        if match:
            name, node_id, inputs, outputs = match.groups()
            rows.append(
                dict(name=name, id=node_id, inputs=_items(inputs), outputs=_items(outputs), line=line)
            )
    return rows


def _items(cell: str) -> list[tuple[str, str | None]]:
    """A table cell as (name, note) pairs: `a, b (optional), loss (LOSS_MAP)` ->
    [("a", None), ("b", "optional"), ("loss", "LOSS_MAP")]."""
    items = []
    for part in cell.split(","):
        match = re.fullmatch(r"\s*(\w+)(?: \(([\w ]+)\))?\s*", part)
        assert match, f"cannot read {part!r} in the README's node table"
        items.append(match.groups())
    return items


def test_the_promised_nodes_keep_their_ids_names_and_category(schemas):
    for node_id, name in PROMISED.items():
        assert node_id in schemas, f"{node_id} is no longer registered"
        assert schemas[node_id].display_name == name, node_id
        assert schemas[node_id].category == CATEGORY, node_id


def test_every_node_is_in_the_pack_category(schemas):
    """The README: 'All nodes are in the "PVA face inpainting" category'."""
    assert f'All nodes are in the "{CATEGORY}" category' in (REPO_ROOT / "README.md").read_text()
    assert {node_id: s.category for node_id, s in schemas.items() if s.category != CATEGORY} == {}


def test_the_readme_node_table_describes_the_registered_nodes(schemas):
    rows = readme_node_rows()
    assert {row["id"] for row in rows} >= set(PROMISED), "the README's node table lost a node"
    for row in rows:
        schema = schemas.get(row["id"])
        assert schema is not None, f"the README lists {row['id']}, which the pack does not register"
        assert row["name"] == schema.display_name, row["line"]
        inputs = [(i.id, "optional" if i.optional else None) for i in schema.inputs]
        assert row["inputs"] == inputs, f"README: {row['inputs']}\nnode:   {inputs}"
        assert len(row["outputs"]) == len(schema.outputs), row["line"]
        for (name, type_), output in zip(row["outputs"], schema.outputs, strict=True):
            # an output is written as its name, its type, or "name (TYPE)"
            assert name in (output.display_name, output.get_io_type()), (row["id"], name)
            assert type_ in (None, output.get_io_type()), (row["id"], name, type_)
