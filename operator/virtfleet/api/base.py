"""The base of every API model: camelCase on the wire, strict specs, CEL rules in one place.

A cross-field rule is written once as a :class:`CelRule`: its CEL expression goes into the
CRD (``x-kubernetes-validations``) so the apiserver refuses bad manifests at apply time,
and its Python predicate runs in pydantic so ``virtfleet validate`` and the agent refuse
the same manifests offline with the same message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema


@dataclass(frozen=True)
class CelRule:
    """One validation rule, enforced by the apiserver (CEL) and by pydantic (``check``)."""

    #: CEL expression; ``None`` when the schema already enforces it structurally
    #: (e.g. list-map keys make names unique) and only the offline check needs code.
    rule: str | None
    message: str
    check: Callable[[Any], bool]
    #: JSONPath-ish field the apiserver reports the error on (e.g. ``.size``).
    field_path: str | None = None
    #: Let a rule compare with the old object (transition rules such as immutability).
    transition: bool = False

    def to_openapi(self) -> dict[str, str] | None:
        if self.rule is None:
            return None
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


class ApiModel(BaseModel):
    """Base for spec models: unknown fields are errors, values are immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_enum_values=False,
        validate_default=True,
    )

    #: Cross-field rules of this model (not inherited: each model lists its own).
    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Self:
        for rule in type(self).__dict__.get("cel_rules", ()):
            if rule.transition:
                continue  # needs the old object; only the apiserver can check it
            if not rule.check(self):
                raise PydanticCustomError("cel_rule", rule.message)
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        target = handler.resolve_ref_schema(json_schema)
        rules = cls.__dict__.get("cel_rules", ())
        validations = [v for v in (rule.to_openapi() for rule in rules) if v is not None]
        if validations:
            target["x-kubernetes-validations"] = validations
        return json_schema

    def to_wire(self) -> dict[str, Any]:
        """The JSON shape Kubernetes stores (camelCase, unset fields left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(ApiModel):
    """Base for status models: lenient on read, so a newer operator's fields don't break us."""

    model_config = ConfigDict(extra="ignore")


# --- Reusable constrained strings -------------------------------------------------------

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
#: Names resolved inside a node's image store or pool list: no separators, no dot-files.
STORE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, max_length=63)]
DnsSubdomain = Annotated[str, StringConstraints(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]
ResourceName = Annotated[str, StringConstraints(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]
StoreName = Annotated[
    str,
    StringConstraints(pattern=STORE_NAME_PATTERN, max_length=128),
    Field(description="A name inside the node's store: letters, digits, '.', '_', '-'; no '..'."),
]


#: What each pattern means, for messages people can act on (the apiserver only quotes it).
PATTERN_HINTS = {
    DNS_LABEL_PATTERN: "must be a DNS label: lowercase letters, digits and '-', "
    "starting and ending with a letter or digit",
    DNS_SUBDOMAIN_PATTERN: "must be a DNS subdomain: lowercase letters, digits, '-' and '.'",
    STORE_NAME_PATTERN: "must be a plain name (letters, digits, '.', '_', '-'), not a path",
}


def no_dot_dot(name: str | None) -> bool:
    """Store names never walk up a directory, even though the store resolves names itself."""
    return name is None or ".." not in name
