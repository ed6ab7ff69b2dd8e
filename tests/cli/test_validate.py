"""``virtfleet validate`` over the shipped examples: good ones pass, bad ones say why."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from virtfleet import manifests
from virtfleet.cli import main

INVALID = sorted((Path(__file__).resolve().parents[2] / "examples" / "invalid").glob("*.yaml"))


def expected_problems(path: Path) -> list[str]:
    return re.findall(r"^# expect: (.*)$", path.read_text(), flags=re.MULTILINE)


def test_good_examples_are_valid(examples_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = sorted(examples_dir.glob("*.yaml"))
    assert len(good) >= 5
    assert main(["validate", *map(str, good)]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_each_bad_example_names_field_and_reason(path: Path) -> None:
    expected = expected_problems(path)
    assert expected, f"{path} lacks '# expect:' lines"
    _, problems = manifests.validate_paths([path])
    found = sorted(f"{p.field}: {p.message}" if p.field else p.message for p in problems)
    assert found == sorted(expected)


def test_folder_exit_code_and_one_line_per_problem(
    examples_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(examples_dir)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == sum(len(expected_problems(p)) for p in INVALID)
    assert all(line.startswith(str(examples_dir / "invalid")) for line in out)


def test_foreign_objects_pass_untouched(tmp_path: Path) -> None:
    (tmp_path / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\n---\n"
        "apiVersion: virtfleet.io/v1alpha1\nkind: VMRestore\nmetadata: {name: r}\n"
        "spec: {vmName: demo, snapshotName: s}\n"
    )
    checked, problems = manifests.validate_paths([tmp_path])
    assert problems == []
    assert [c.kind.kind for c in checked] == ["VMRestore"]


def test_unreadable_yaml_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    _, problems = manifests.validate_paths([tmp_path])
    assert len(problems) == 1
    assert "cannot read YAML" in problems[0].message


def test_missing_path_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_crds_check(tmp_path: Path) -> None:
    assert main(["crds", "-o", str(tmp_path)]) == 0
    assert main(["crds", "--check", "-o", str(tmp_path)]) == 0
    next(tmp_path.glob("*.yaml")).write_text("changed")
    assert main(["crds", "--check", "-o", str(tmp_path)]) == 1
