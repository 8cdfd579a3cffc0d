"""The address type of the wire: where to connect, or where to listen."""

from __future__ import annotations

import attrs


@attrs.frozen
class HostPort:
    """A parsed ``host:port``. An empty host means "all interfaces" when listening."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
