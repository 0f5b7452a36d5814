"""Sans-I/O PostgreSQL v3 wire protocol: framing, decoding of what the proxy reads, builders."""

from tvproxy.protocol.errors import ProtocolError
from tvproxy.protocol.framing import CONTINUATION, Framer

__all__ = ["CONTINUATION", "Framer", "ProtocolError"]
