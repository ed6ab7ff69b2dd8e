"""Offline validation of manifests: what ``virtfleet validate`` runs in a GitOps repo's CI.

It applies the same models, and so the same rules, as the CRDs do at apply time, and
reports each problem as one line naming the file, the object and the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from virtfleet.api.backup import BUCKET_PATTERN, ENDPOINT_PATTERN
from virtfleet.api.base import DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, PATTERN_HINTS
from virtfleet.api.network import IPV4_CIDR_PATTERN, IPV4_PATTERN, NAMESPACE_ENTRY_PATTERN
from virtfleet.api.resources import KINDS_BY_NAME, Kind, Resource, resource_model
from virtfleet.api.virtualmachine import HTTP_URL_PATTERN, PRINTABLE_PATTERN
from virtfleet.identity import API_GROUP

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
_DNS_SUBDOMAIN = re.compile(DNS_SUBDOMAIN_PATTERN)
_DNS_LABEL = re.compile(DNS_LABEL_PATTERN)
_MODEL_HINTS = {
    BUCKET_PATTERN: "must be an S3 bucket name: 3-63 lowercase letters, digits, '.' and '-'",
    ENDPOINT_PATTERN: "must be an http(s)://host[:port][/path] URL in printable ASCII, "
    "without credentials",
    HTTP_URL_PATTERN: "must be an http(s)://host[:port]/path URL in printable ASCII, "
    "without credentials (percent-encode other characters)",
    IPV4_CIDR_PATTERN: "must be an IPv4 CIDR such as 10.20.0.0/24",
    IPV4_PATTERN: "must be an IPv4 address such as 10.20.0.1",
    NAMESPACE_ENTRY_PATTERN: "must be a namespace name (a DNS label) or '*'",
}


@dataclass(frozen=True)
class Problem:
    """One reason a manifest would be refused."""

    source: str
    obj: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: {self.obj}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


@dataclass(frozen=True)
class Document:
    source: str
    index: int
    body: Any


@dataclass(frozen=True)
class Checked:
    """A virtfleet object that passed validation, with its typed model."""

    source: str
    kind: Kind
    resource: Resource[Any, Any]


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Manifest files under the given files/directories, in a stable order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix in MANIFEST_SUFFIXES)
        else:
            yield path


def load_documents(path: Path) -> Iterator[Document]:
    text = path.read_text()
    for index, body in enumerate(yaml.safe_load_all(text)):
        if body is not None:
            yield Document(source=f"{path}#{index}" if index else str(path), index=index, body=body)


def field_path(loc: tuple[int | str, ...]) -> str:
    """``('spec', 'disks', 0, 'source')`` → ``spec.disks[0].source``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "tagged-union")):
            continue  # pydantic's internal validator names, not fields
        else:
            out += f".{part}" if out else part
    return out


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if (
        kind == "string_pattern_mismatch"
        and error.get("ctx", {}).get("pattern") == PRINTABLE_PATTERN
    ):
        return "must not contain control characters (newlines, tabs, NUL, ...) or U+FFFE, U+FFFF"
    if kind == "string_pattern_mismatch":
        pattern = error.get("ctx", {}).get("pattern", "")
        hint = PATTERN_HINTS.get(pattern) or _MODEL_HINTS.get(pattern)
        if hint:
            return f"{hint}; got {error['input']!r}"
    message: str = error["msg"]
    return message.removeprefix("Value error, ")


def describe(body: Any) -> str:
    if not isinstance(body, dict):
        return "<not an object>"
    meta = body.get("metadata") or {}
    name = meta.get("name") or meta.get("generateName") or "<unnamed>"
    described = f"{body.get('kind', '<no kind>')}/{name}"
    # One problem per line: a name with a newline must not split (or forge) a line.
    return described if described.isprintable() else repr(described)


def is_virtfleet(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("apiVersion"), str)
        and body["apiVersion"].split("/")[0] == API_GROUP
    )


def _metadata_problems(doc: Document, obj: str, meta: Any) -> list[Problem]:
    """The apiserver's own name rules, which every kind's objects must meet."""
    if not isinstance(meta, dict):
        return []
    found = []
    name = meta.get("name")
    if isinstance(name, str) and not (len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name)):
        found.append(
            Problem(doc.source, obj, "metadata.name", PATTERN_HINTS[DNS_SUBDOMAIN_PATTERN])
        )
    namespace = meta.get("namespace")
    if isinstance(namespace, str) and not (
        len(namespace) <= 63 and _DNS_LABEL.fullmatch(namespace)
    ):
        found.append(
            Problem(doc.source, obj, "metadata.namespace", PATTERN_HINTS[DNS_LABEL_PATTERN])
        )
    return found


def check_document(doc: Document) -> tuple[Checked | None, list[Problem]]:
    """Validate one object; non-virtfleet objects pass untouched (a GitOps folder mixes kinds)."""
    body = doc.body
    obj = describe(body)
    if not isinstance(body, dict):
        return None, [Problem(doc.source, obj, "", "a manifest must be a mapping")]
    if not is_virtfleet(body):
        return None, []
    kind = KINDS_BY_NAME.get(str(body.get("kind")))
    if kind is None:
        known = ", ".join(sorted(KINDS_BY_NAME))
        return None, [Problem(doc.source, obj, "kind", f"unknown kind; expected one of {known}")]

    try:
        resource = resource_model(kind).model_validate(body)
    except ValidationError as exc:
        problems = [
            Problem(doc.source, obj, field_path(tuple(err["loc"])), _message(err))
            for err in exc.errors()
        ]
        return None, problems

    problems = _metadata_problems(doc, obj, body.get("metadata"))
    if kind.spec_required and resource.spec is None:
        problems.append(Problem(doc.source, obj, "spec", "required field is missing"))
    if not kind.namespaced and resource.metadata.namespace:
        problems.append(
            Problem(doc.source, obj, "metadata.namespace", f"{kind.kind} is cluster-scoped")
        )
    problems.extend(
        Problem(doc.source, obj, "metadata.name", rule.message)
        for rule in kind.root_rules
        if not rule.check(resource)
    )
    if problems:
        return None, problems
    return Checked(doc.source, kind, resource), []


def _internal_error(doc: Document, exc: Exception) -> Problem:
    return Problem(
        doc.source,
        describe(doc.body),
        "",
        f"cannot be validated ({exc.__class__.__name__}: {exc}); this is a virtfleet bug, "
        "the apiserver decides",
    )


def validate_paths(paths: Iterable[Path]) -> tuple[list[Checked], list[Problem]]:
    """Every virtfleet object under ``paths``: the valid ones and every problem found."""
    checked: list[Checked] = []
    problems: list[Problem] = []
    for path in iter_files(paths):
        try:
            documents = list(load_documents(path))
        except (OSError, yaml.YAMLError) as exc:
            problems.append(Problem(str(path), "<file>", "", f"cannot read YAML: {exc}"))
            continue
        for doc in documents:
            try:
                ok, found = check_document(doc)
            except Exception as exc:  # one bad document must not hide the others
                # Every refusal should be a ValidationError; reaching this is a bug, so say so.
                ok, found = None, [_internal_error(doc, exc)]
            problems.extend(found)
            if ok is not None:
                checked.append(ok)
    return checked, problems
