"""The pack loads in a real ComfyUI server, and the harness reports import failures."""

from harness.pack import registered_node_ids
from harness.server import PACK_DIR_NAME, make_base_directory


def test_object_info_lists_every_node_of_the_pack(comfy_server):
    expected = registered_node_ids()
    assert len(expected) >= 5
    info = comfy_server.object_info()
    missing = [n for n in expected if n not in info]
    assert not missing, f"not served by /object_info: {missing}"
    for node_id in expected:
        node = info[node_id]
        assert node["python_module"].startswith("custom_nodes."), node["python_module"]
        for spec in list(node["input"].get("required", {}).values()) + list(
            node["input"].get("optional", {}).values()
        ):
            assert spec[1].get("tooltip") if len(spec) > 1 else False, (
                f"{node_id}: an input without a tooltip"
            )


def test_server_log_has_no_import_error_for_the_pack(comfy_server):
    log = comfy_server.log()
    assert PACK_DIR_NAME in log, "the pack was not even looked at"
    assert not [line for line in comfy_server.import_failures() if PACK_DIR_NAME in line]
    assert "Cannot import" not in log


def test_model_folders_are_registered(comfy_server):
    # /models lists the registered model folder names
    folders = comfy_server.get_json("/models")
    assert "pva" in folders and "facenet" in folders


def test_harness_reports_a_pack_that_fails_to_import(tmp_path, start_server):
    base = make_base_directory(tmp_path / "base", pack_dir=None)
    broken = base / "custom_nodes" / "broken_pack"
    broken.mkdir()
    (broken / "__init__.py").write_text("import a_module_that_does_not_exist\n")
    server = start_server(base)
    failures = server.import_failures()
    assert any("broken_pack" in line for line in failures), server.log()[-3000:]
