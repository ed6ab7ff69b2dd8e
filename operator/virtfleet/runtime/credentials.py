"""Where the apiserver is and who we are to it: one loader for kopf's session and ours.

Both clients take a :class:`kopf.ConnectionInfo`. A kubeconfig is read by the official
client's loader when that library is importable (every kubeconfig feature: exec
plugins, relative paths, ``tokenFile``), else by kopf's minimal reader; a pod's service
account by kopf's reader. The agent leaves the official client out
(:func:`virtfleet.runtime.memory.leave_out_official_client`): it runs in a pod with a
service account, and ``kubernetes.client`` is ~18 MiB in every agent of a fleet.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

#: The kubelet's variables for the ``kubernetes`` Service (what the official client reads).
SERVICE_HOST_ENV = "KUBERNETES_SERVICE_HOST"
SERVICE_PORT_ENV = "KUBERNETES_SERVICE_PORT"


def load_connection() -> kopf.ConnectionInfo:
    """KUBECONFIG (or ~/.kube/config) when present, otherwise the in-cluster service account.

    An explicit KUBECONFIG wins even inside a pod, so a developer can point a local
    process anywhere; a pod without one uses its service account, like kopf does.
    """
    settings = kopf.OperatorSettings()
    info: kopf.ConnectionInfo | None
    if os.environ.get("KUBECONFIG") or SERVICE_HOST_ENV not in os.environ:
        info = _kubeconfig_via_official_client(settings)
        if info is None:
            info = kopf.login_with_kubeconfig(settings=settings)
    else:
        info = _service_account(settings)
    if info is None:
        raise kopf.LoginError("no kubeconfig and no in-cluster service account")
    return info


def _kubeconfig_via_official_client(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    """The official client's reading of the kubeconfig (exec plugins and all), as kopf's
    ``login_via_client`` interprets it; None when the library is left out."""
    try:
        from kubernetes import client, config
    except ImportError:
        return None
    configuration = client.Configuration()
    # The library reads $KUBECONFIG once, when imported: name it as it is now.
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration
    )
    # Older releases keep the token under "authorization"; exec plugins refresh it here.
    header = configuration.get_api_key_with_prefix(
        "BearerToken", alias="authorization"
    ) or configuration.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        proxy_url=configuration.proxy,
        trust_env=settings.networking.trust_env,
    )


def _service_account(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    """kopf's service-account login, at the address the kubelet gives the pod.

    kopf names ``https://kubernetes.default.svc``, which a host-network pod without
    cluster DNS (the agent) cannot resolve; the official client uses these variables.
    """
    info = kopf.login_with_service_account(settings=settings)
    host, port = os.environ.get(SERVICE_HOST_ENV), os.environ.get(SERVICE_PORT_ENV, "443")
    if info is None or not host:
        return info
    host = f"[{host}]" if ":" in host else host
    return dataclasses.replace(info, server=f"https://{host}:{port}")


def client_session(
    info: kopf.ConnectionInfo, *, limit: int, headers: Mapping[str, str], **options: Any
) -> aiohttp.ClientSession:
    """An aiohttp session to ``info``'s apiserver, as kopf builds one, with at most
    ``limit`` connections; ``headers`` join the credentials' and ``options`` go to
    :class:`aiohttp.ClientSession`. Needs a running event loop."""
    with warnings.catch_warnings():  # as kopf does: basic auth is deprecated, not removed
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        auth = info.as_aiohttp_basic_auth()
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ssl=info.as_ssl_context()),
        headers={**info.as_http_headers(), **headers},
        auth=auth,
        proxy=info.proxy_url,
        trust_env=info.trust_env,
        **options,
    )
