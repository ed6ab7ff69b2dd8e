"""The generated CRDs: committed copies match the models, and schemas are structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from virtfleet import crdgen
from virtfleet.api.resources import KINDS, Kind


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.get("properties", {}).items():
            found += walk(value, f"{path}.{key}")
        if "items" in node:
            found += walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            found += walk(node["additionalProperties"], f"{path}{{}}")
    return found


@pytest.mark.parametrize("directory", crdgen.DEFAULT_DIRECTORIES)
def test_committed_crds_match_the_models(repo: Path, directory: str) -> None:
    """Both copies (crds/ and the Helm chart's crds/) are what the models generate."""
    assert crdgen.drift(repo / directory) == [], "run `virtfleet crds` and commit the result"


def test_check_covers_the_chart_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`virtfleet crds` writes both copies and `--check` fails when either one drifts."""
    from virtfleet.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["crds"]) == 0
    assert main(["crds", "--check"]) == 0
    chart_copy = tmp_path / "charts" / "virtfleet" / "crds" / crdgen.crd_filename(KINDS[0])
    chart_copy.write_text(chart_copy.read_text() + "# edited\n")
    assert main(["crds", "--check"]) == 1


def test_drift_is_detected(tmp_path: Path) -> None:
    crdgen.write_all(tmp_path)
    assert crdgen.drift(tmp_path) == []
    target = tmp_path / crdgen.crd_filename(KINDS[0])
    target.write_text(target.read_text().replace("maxLength: 63", "maxLength: 64", 1))
    assert crdgen.drift(tmp_path) == [f"{target}: differs from the models"]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_schemas_are_structural(kind: Kind) -> None:
    crd = yaml.safe_load(crdgen.render_crd(kind))
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    assert "$ref" not in text
    assert "title" not in {k for _, node in walk(schema) for k in node}
    for path, node in walk(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} untyped"
        assert "default" not in node, f"{path}: the CRD never defaults spec"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{path}: anyOf only for int-or-string"


def test_vm_crd_has_what_kubectl_users_expect() -> None:
    crd = crdgen.crd_for(KINDS[0])
    names = crd["spec"]["names"]
    assert names["shortNames"][0] == "vm"
    assert "virtfleet" in names["categories"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Status", "Node", "Ready", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    assert schema["required"] == ["spec"]
    disks = schema["properties"]["spec"]["properties"]["disks"]
    assert disks["x-kubernetes-list-type"] == "map"
    assert disks["maxItems"] == 12
    source = disks["items"]["properties"]["source"]
    assert any("exactly one" in v["message"] for v in source["x-kubernetes-validations"])
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_one_shot_kinds_have_immutable_specs() -> None:
    for kind in KINDS:
        if kind.kind in {"VMSnapshot", "VMRestore", "VMMigration"}:
            spec = crdgen.crd_for(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
                "properties"
            ]["spec"]
            assert {
                "rule": "self == oldSelf",
                "message": "spec is immutable; create a new object instead",
            } in spec["x-kubernetes-validations"]


def test_vmhost_is_cluster_scoped() -> None:
    crd = crdgen.crd_for(next(k for k in KINDS if k.kind == "VMHost"))
    assert crd["spec"]["scope"] == "Cluster"
