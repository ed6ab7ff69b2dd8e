"""The console endpoint's TLS: a self-signed certificate made at start, pinned by clients.

Clients learn the certificate's SHA-256 from the VM's ``status.consoleEndpoint``, which
only the agents write (the chart's admission guard), so trust comes from the apiserver
like everything else a client reads there: no CA to run or rotate. A new agent process
makes a new key; the fingerprint in status follows on the next write.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass

__all__ = ["ServingCertificate", "make_certificate", "server_context"]

#: The certificate outlives any agent process (a new one makes a new certificate).
VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class ServingCertificate:
    cert_pem: bytes
    key_pem: bytes
    #: SHA-256 of the DER certificate, lower-case hex: what clients pin.
    sha256: str


def make_certificate(host: str, node: str) -> ServingCertificate:
    """A P-256 key and a self-signed certificate for ``host`` (an address or a name)."""
    # Imported here: ~18 MiB of every agent, for agents that serve no console.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"virtfleet-console {node}")])
    alternative: list[x509.GeneralName] = [x509.DNSName(node)]
    try:
        alternative.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        alternative.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    return ServingCertificate(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        sha256=hashlib.sha256(der).hexdigest(),
    )


def server_context(cert: ServingCertificate, client_ca_pem: str | None) -> ssl.SSLContext:
    """TLS ≥ 1.2 serving ``cert``; client certificates are asked for and checked against
    the cluster's client CA when it is known (a user of a certificate kubeconfig), and
    optional (a user of a token sends none)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # ssl loads chains from files only: a private directory, gone right after.
    with tempfile.TemporaryDirectory(prefix="virtfleet-console-") as directory:
        cert_path = os.path.join(directory, "tls.crt")
        key_path = os.path.join(directory, "tls.key")
        with open(os.open(cert_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as out:
            out.write(cert.cert_pem)
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as out:
            out.write(cert.key_pem)
        context.load_cert_chain(cert_path, key_path)
    if client_ca_pem:
        context.load_verify_locations(cadata=client_ca_pem)
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
