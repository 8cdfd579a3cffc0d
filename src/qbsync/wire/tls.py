"""TLS contexts for the wire protocol (optional; used through ``trio.SSLStream``).

The destination serves TLS when it has ``--tls-cert``/``--tls-key``; the source enables TLS
with ``--tls-ca`` (the CA bundle, or the destination's self-signed certificate itself, that
must have signed the destination's certificate). Verification is always on: there is
deliberately no "insecure" switch (qBittorrent's CVE-2024-51774 is the cautionary tale). The
certificate must name the address the source connects to (a DNS or IP subjectAltName), or the
source passes ``server_hostname`` explicitly.

TLS and the handshake are complementary: the peer keys (and the token, when set) decide
*who* may talk to whom, and the per-frame tags keep an authenticated stream from being
hijacked; TLS adds confidentiality. Use TLS (or a VPN) across the internet.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def server_ssl_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server-side context presenting ``cert`` (PEM chain) with ``key`` (PEM). TLS >= 1.2.

    Raises ``OSError``/``ssl.SSLError`` if the files cannot be read or do not match.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return ctx


def client_ssl_context(ca: str | Path) -> ssl.SSLContext:
    """A client-side context that trusts only ``ca`` (PEM) and checks the host name."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
