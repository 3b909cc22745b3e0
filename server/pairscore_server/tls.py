"""TLS (and mutual TLS) credentials for the gRPC port, from PEM files."""

from __future__ import annotations

from pathlib import Path

import grpc


def _read_pem(path: str, what: str, marker: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data or marker.encode() not in data:
        raise ValueError(f"the {what} {path} is not a PEM file holding a {marker}")
    return data


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """Server credentials from a PEM certificate chain and key.

    With ``client_ca``, clients must present a certificate that this CA
    bundle verifies (mutual TLS); otherwise client certificates are not
    asked for. Raises ValueError naming the file when one cannot be used.
    """
    cert_pem = _read_pem(cert, "TLS certificate", "CERTIFICATE")
    key_pem = _read_pem(key, "TLS private key", "PRIVATE KEY")
    ca_pem = _read_pem(client_ca, "client CA bundle", "CERTIFICATE") if client_ca else None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=ca_pem,
        require_client_auth=ca_pem is not None,
    )
