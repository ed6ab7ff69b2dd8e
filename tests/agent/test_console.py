"""`virtfleet console`'s endpoint without a cluster: who may connect, how they are told no.

The reviews are answered by a fake apiserver; the endpoint itself runs for real (TLS,
aiohttp), and a client pins its certificate as ``virtfleet console`` does.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import kopf
import pytest

from virtfleet.agent.console import CLIENT_CA_CONFIGMAP as CLIENT_CA
from virtfleet.agent.console import MESSAGE_HEADER, ConsoleServer, console_path
from virtfleet.agent.consoleauth import (
    AccessRefusedError,
    Caller,
    ReviewCache,
    access_review,
    authenticate,
    authorize,
    bearer_token,
    caller_from_certificate,
    caller_from_token_review,
)
from virtfleet.agent.consoletls import make_certificate
from virtfleet.consolecli import credentials
from virtfleet.hypervisor import Hypervisor
from virtfleet.runtime.addresses import split_listen
from virtfleet.runtime.kubeapi import ApiUnavailable

ALICE = {
    "authenticated": True,
    "user": {
        "username": "alice",
        "uid": "u-1",
        "groups": ["devs", "system:authenticated"],
        "extra": {"scopes": ["a"]},
    },
}


class FakeApi:
    """Answers TokenReviews and SubjectAccessReviews from fixed tables."""

    def __init__(self, *, tokens: dict[str, Any] | None = None, allowed: bool = False) -> None:
        self.tokens = tokens or {}
        self.allowed = allowed
        self.requests: list[tuple[str, str, Any]] = []
        self.down = False

    async def request(self, method: str, path: str, *, body: Any = None) -> Any:
        self.requests.append((method, path, body))
        if self.down:
            raise ApiUnavailable("connection refused")
        if path.endswith("/tokenreviews"):
            return {"status": self.tokens.get(body["spec"]["token"], {"authenticated": False})}
        if path.endswith("/subjectaccessreviews"):
            return {"status": {"allowed": self.allowed}}
        return {}  # the client CA ConfigMap: none published


class NoDomains:
    """A node where the VM has no domain — or only someone else's of that name."""

    def __init__(self) -> None:
        self.foreign = False

    async def lookup_by_name(self, name: str) -> Any:
        if not self.foreign:
            return None

        async def xml() -> str:
            return f"<domain type='kvm'><name>{name}</name><metadata/></domain>"

        return SimpleNamespace(xml=xml)


# --- pure ----------------------------------------------------------------------------


def test_a_verified_certificate_names_user_and_groups() -> None:
    peer = {"subject": ((("organizationName", "ops"),), (("commonName", "bob"),))}
    caller = caller_from_certificate(peer)
    assert caller == Caller("bob", "certificate", groups=("ops", "system:authenticated"))
    assert caller_from_certificate(None) is None
    assert caller_from_certificate({"subject": ((("organizationName", "ops"),),)}) is None


def test_a_token_the_apiserver_does_not_know_is_401() -> None:
    with pytest.raises(AccessRefusedError) as refused:
        caller_from_token_review({"status": {"authenticated": False, "error": "expired"}})
    assert (refused.value.status, "expired" in refused.value.message) == (401, True)


def test_the_access_review_asks_for_the_console_of_that_vm() -> None:
    caller = caller_from_token_review({"status": ALICE})
    review = access_review(caller, "ns", "web")
    assert review["spec"]["resourceAttributes"] == {
        "group": "virtfleet.io",
        "resource": "virtualmachines",
        "subresource": "console",
        "verb": "get",
        "namespace": "ns",
        "name": "web",
    }
    assert (review["spec"]["user"], review["spec"]["uid"]) == ("alice", "u-1")
    assert review["spec"]["groups"] == ["devs", "system:authenticated"]
    assert review["spec"]["extra"] == {"scopes": ["a"]}


@pytest.mark.parametrize(
    ("header", "token"),
    [(None, None), ("", None), ("Basic abc", None), ("Bearer  t0k ", "t0k"), ("bearer x", "x")],
)
def test_only_bearer_tokens_are_tokens(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_listen_addresses() -> None:
    assert split_listen("10.0.0.1:8450") == ("10.0.0.1", 8450)
    assert split_listen("[fd00::1]:8450") == ("fd00::1", 8450)
    for bad in ("10.0.0.1", ":8450", "host:port"):
        with pytest.raises(ValueError, match="want host:port"):
            split_listen(bad)


def test_a_certificate_kubeconfig_sends_no_token(tmp_path: Path) -> None:
    cert = make_certificate("127.0.0.1", "me")
    (tmp_path / "c.pem").write_bytes(cert.cert_pem)
    (tmp_path / "k.pem").write_bytes(cert.key_pem)
    info = kopf.ConnectionInfo(
        server="https://127.0.0.1:6443",
        certificate_path=str(tmp_path / "c.pem"),
        private_key_path=str(tmp_path / "k.pem"),
        token="abc",
    )
    headers, context = credentials(info)
    assert headers == {}
    assert context.verify_mode == ssl.CERT_NONE  # the caller pins the endpoint's certificate


def test_reviews_are_remembered_briefly_refusals_too() -> None:
    now = [0.0]
    cache = ReviewCache(ttl=10.0, size=2, clock=lambda: now[0])
    cache.put("bad", {"status": {"authenticated": False}})
    assert cache.get("bad") == {"status": {"authenticated": False}}
    now[0] = 11.0
    assert cache.get("bad") is None
    for token in ("a", "b", "c"):
        cache.put(token, {})
    assert cache.get("a") is None  # the oldest went
    assert ReviewCache.key("a") != "a"  # tokens are not kept


def test_the_client_sends_the_kubeconfigs_token() -> None:
    info = kopf.ConnectionInfo(server="https://127.0.0.1:6443", token="abc")
    headers, _ = credentials(info)
    assert headers == {"Authorization": "Bearer abc"}


# --- with the apiserver's answers -------------------------------------------------------


async def test_certificate_first_then_token() -> None:
    api = FakeApi(tokens={"good": ALICE})
    peer = {"subject": ((("commonName", "bob"),),)}
    assert (await authenticate(api, "Bearer good", peer)).username == "bob"
    assert api.requests == []  # no review needed
    assert (await authenticate(api, "Bearer good", None)).username == "alice"
    with pytest.raises(AccessRefusedError, match="send a bearer token"):
        await authenticate(api, None, None)


async def test_an_apiserver_that_cannot_answer_refuses_with_503() -> None:
    api = FakeApi(tokens={"good": ALICE})
    api.down = True
    with pytest.raises(AccessRefusedError) as refused:
        await authenticate(api, "Bearer good", None)
    assert refused.value.status == 503
    with pytest.raises(AccessRefusedError) as refused:
        await authorize(api, Caller("alice", "token"), "ns", "web")
    assert refused.value.status == 503


async def test_a_denied_review_says_what_is_missing() -> None:
    with pytest.raises(AccessRefusedError) as refused:
        await authorize(FakeApi(allowed=False), Caller("alice", "token"), "ns", "web")
    assert refused.value.status == 403
    assert 'cannot get resource "virtualmachines/console"' in refused.value.message


# --- the endpoint ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


HOSTS = NoDomains()


@pytest.fixture
async def endpoint(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str, FakeApi]]:
    api = FakeApi(tokens={"good": ALICE}, allowed=getattr(request, "param", False))
    HOSTS.foreign = False
    server = ConsoleServer("node-a", f"127.0.0.1:{free_port()}", None, cast(Hypervisor, HOSTS), api)
    address = await server.start()
    try:
        yield address.base_url + console_path("ns", "web"), address.certificate_sha256, api
    finally:
        await server.stop()


async def connect(url: str, sha256: str, token: str | None) -> aiohttp.WSServerHandshakeError:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    pinned = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(sha256)))
    async with aiohttp.ClientSession(connector=pinned) as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, headers=headers)
    return refused.value


def message(refused: aiohttp.WSServerHandshakeError) -> str:
    assert refused.headers is not None
    return str(refused.headers[MESSAGE_HEADER])


async def test_no_credentials_no_console(endpoint: tuple[str, str, FakeApi]) -> None:
    url, sha256, _ = endpoint
    refused = await connect(url, sha256, None)
    assert refused.status == 401
    assert "send a bearer token" in message(refused)


async def test_a_user_without_the_right_is_refused(endpoint: tuple[str, str, FakeApi]) -> None:
    url, sha256, api = endpoint
    refused = await connect(url, sha256, "good")
    assert refused.status == 403
    assert 'User "alice" cannot get' in message(refused)
    review = next(body for _, path, body in api.requests if path.endswith("accessreviews"))
    assert review["spec"]["resourceAttributes"]["name"] == "web"


@pytest.mark.parametrize("endpoint", [True], indirect=True)
async def test_an_allowed_user_of_a_vm_not_here_is_told_so(
    endpoint: tuple[str, str, FakeApi],
) -> None:
    url, sha256, _ = endpoint
    refused = await connect(url, sha256, "good")
    assert refused.status == 404
    assert "has no domain on node node-a" in message(refused)


async def test_a_client_pinning_another_certificate_sends_nothing(
    endpoint: tuple[str, str, FakeApi],
) -> None:
    url, _, api = endpoint
    pinned = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes(32)))
    async with aiohttp.ClientSession(connector=pinned) as session:
        with pytest.raises(aiohttp.ServerFingerprintMismatch):
            await session.ws_connect(url, headers={"Authorization": "Bearer good"})
    assert not [p for _, p, _ in api.requests if p.endswith("tokenreviews")]


@pytest.mark.parametrize("endpoint", [True], indirect=True)
async def test_a_domain_of_that_name_without_our_marker_is_not_attached(
    endpoint: tuple[str, str, FakeApi],
) -> None:
    url, sha256, _ = endpoint
    HOSTS.foreign = True
    refused = await connect(url, sha256, "good")
    assert refused.status == 404


async def test_plain_requests_and_bad_names_are_refused_before_any_review(
    endpoint: tuple[str, str, FakeApi],
) -> None:
    url, sha256, api = endpoint
    pinned = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(sha256)))
    async with (
        aiohttp.ClientSession(connector=pinned) as session,
        session.get(url, headers={"Authorization": "Bearer good"}) as answer,
    ):
        assert answer.status == 400
        assert (await answer.json())["reason"] == "BadRequest"
    refused = await connect(url.replace("/namespaces/ns/", "/namespaces/NS_x/"), sha256, "good")
    assert refused.status == 400
    assert api.requests == [("GET", CLIENT_CA, None)]  # only the start-up's CA lookup


async def test_a_repeated_bad_token_is_reviewed_once(endpoint: tuple[str, str, FakeApi]) -> None:
    url, sha256, api = endpoint
    for _ in range(3):
        assert (await connect(url, sha256, "stolen")).status == 401
    assert len([p for _, p, _ in api.requests if p.endswith("tokenreviews")]) == 1
