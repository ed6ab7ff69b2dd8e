"""Who is asking for a console, and may they: the kubelet's model for ``exec``/``attach``.

Authentication as the apiserver would: a client certificate signed by the cluster's
client CA (user = CN, groups = O), else a bearer token the apiserver vouches for in a
``TokenReview`` (service-account tokens, OIDC, whatever the cluster trusts).
Authorisation by the apiserver too: a ``SubjectAccessReview`` for ``get`` on
``virtualmachines/console`` (group ``virtfleet.io``) of that VM, so an ordinary
Role/RoleBinding grants or refuses it and the decision is the cluster's, not ours.
The reviews' bodies and their reading are pure; only :func:`authenticate` and
:func:`authorize` talk to the apiserver.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from virtfleet.identity import API_GROUP
from virtfleet.runtime.kubeapi import KubeError

__all__ = [
    "CONSOLE_SUBRESOURCE",
    "AccessRefusedError",
    "Caller",
    "ReviewCache",
    "access_review",
    "authenticate",
    "authorize",
    "caller_from_certificate",
    "caller_from_token_review",
]

CONSOLE_SUBRESOURCE: Final = "console"
AUTHENTICATED: Final = "system:authenticated"
TOKEN_REVIEWS: Final = "/apis/authentication.k8s.io/v1/tokenreviews"
ACCESS_REVIEWS: Final = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


class RestApi(Protocol):
    """What the reviews need of a Kubernetes client (``KubeClient``)."""

    async def request(self, method: str, path: str, *, body: Any = None) -> Any: ...


class AccessRefusedError(Exception):
    """The caller gets ``status`` (401: who are you; 403: not you; 503: cannot tell)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Caller:
    username: str
    #: ``certificate`` or ``token``: for the audit line.
    via: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def caller_from_certificate(peercert: Mapping[str, Any] | None) -> Caller | None:
    """The user a verified client certificate names (``ssl``'s ``getpeercert()``)."""
    if not peercert:
        return None
    names: list[tuple[str, str]] = [
        (str(key), str(value)) for rdn in peercert.get("subject", ()) for key, value in rdn
    ]
    common = [value for key, value in names if key == "commonName"]
    if not common or not common[0]:
        return None
    groups = [value for key, value in names if key == "organizationName"]
    return Caller(username=common[0], via="certificate", groups=(*groups, AUTHENTICATED))


def token_review(token: str) -> dict[str, Any]:
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token},
    }


def caller_from_token_review(review: Mapping[str, Any]) -> Caller:
    """The user the apiserver found behind the token, or :class:`AccessRefusedError` (401)."""
    status = review.get("status") or {}
    if not status.get("authenticated"):
        reason = status.get("error") or "the token is not valid"
        raise AccessRefusedError(401, f"Unauthorized: {reason}")
    user = status.get("user") or {}
    extra = {str(k): tuple(str(v) for v in vs) for k, vs in (user.get("extra") or {}).items()}
    return Caller(
        username=str(user.get("username") or ""),
        via="token",
        uid=str(user.get("uid") or ""),
        groups=tuple(str(g) for g in user.get("groups") or ()),
        extra=extra,
    )


def access_review(caller: Caller, namespace: str, name: str) -> dict[str, Any]:
    """The SubjectAccessReview for ``get virtualmachines/console`` of one VM."""
    spec: dict[str, Any] = {
        "user": caller.username,
        "groups": list(caller.groups),
        "resourceAttributes": {
            "group": API_GROUP,
            "resource": "virtualmachines",
            "subresource": CONSOLE_SUBRESOURCE,
            "verb": "get",
            "namespace": namespace,
            "name": name,
        },
    }
    if caller.uid:
        spec["uid"] = caller.uid
    if caller.extra:
        spec["extra"] = {k: list(v) for k, v in caller.extra.items()}
    return {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": spec,
    }


def refusal(review: Mapping[str, Any], caller: Caller, namespace: str, name: str) -> str | None:
    """None when allowed; otherwise the message a user reads (kubectl's wording)."""
    status = review.get("status") or {}
    if status.get("allowed") and not status.get("denied"):
        return None
    why = status.get("reason") or status.get("evaluationError") or ""
    return (
        f'virtualmachines.{API_GROUP} "{name}" is forbidden: User "{caller.username}" cannot '
        f'get resource "virtualmachines/console" in API group "{API_GROUP}" in the namespace '
        f'"{namespace}"' + (f": {why}" if why else "")
    )


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class ReviewCache:
    """TokenReview answers by the token's SHA-256 for ``ttl`` seconds, refusals included
    (as the apiserver's webhook authenticator caches): a client retrying, or a stranger
    repeating a bad token, costs the apiserver one review, not one per request."""

    def __init__(
        self, ttl: float = 10.0, size: int = 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._answers: OrderedDict[str, tuple[float, Mapping[str, Any]]] = OrderedDict()

    @staticmethod
    def key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def get(self, token: str) -> Mapping[str, Any] | None:
        found = self._answers.get(self.key(token))
        if found is None or self.clock() - found[0] > self.ttl:
            return None
        return found[1]

    def put(self, token: str, review: Mapping[str, Any]) -> None:
        self._answers[self.key(token)] = (self.clock(), review)
        self._answers.move_to_end(self.key(token))
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)


async def authenticate(
    api: RestApi,
    authorization: str | None,
    peercert: Mapping[str, Any] | None,
    cache: ReviewCache | None = None,
) -> Caller:
    """The caller, by certificate first (as the apiserver's authenticators), else token."""
    caller = caller_from_certificate(peercert)
    if caller is not None:
        return caller
    token = bearer_token(authorization)
    if token is None:
        raise AccessRefusedError(401, "Unauthorized: send a bearer token or a client certificate")
    review = cache.get(token) if cache is not None else None
    if review is None:
        try:
            review = await api.request("POST", TOKEN_REVIEWS, body=token_review(token)) or {}
        except KubeError as exc:
            raise AccessRefusedError(
                503, f"the apiserver could not review the token: {exc}"
            ) from exc
        if cache is not None:
            cache.put(token, review)
    return caller_from_token_review(review)


async def authorize(api: RestApi, caller: Caller, namespace: str, name: str) -> None:
    """Return when the apiserver allows ``caller`` the VM's console; raise otherwise."""
    try:
        review = await api.request(
            "POST", ACCESS_REVIEWS, body=access_review(caller, namespace, name)
        )
    except KubeError as exc:
        raise AccessRefusedError(503, f"the apiserver could not review access: {exc}") from exc
    message = refusal(review or {}, caller, namespace, name)
    if message is not None:
        raise AccessRefusedError(403, message)
