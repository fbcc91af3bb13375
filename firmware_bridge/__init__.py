"""Bytes on a wire between the robot computer and the motor firmware.

Depends on nothing of ours and on numpy only. The wire format is documented in
docs/firmware_protocol.md; ``protocol`` encodes/decodes it, ``transports`` moves frames over
UDP or serial, ``link`` adds sequence filtering and timeouts on top.
"""

from .link import Link, SequenceTracker
from .protocol import (
    MAX_MOTORS,
    PROTOCOL_VERSION,
    CommandMsg,
    Decoder,
    Frame,
    LinkStats,
    Message,
    Mode,
    ModeRequestMsg,
    MsgType,
    ProtocolVersionError,
    StateMsg,
    decode_datagram,
    encode,
)
from .transports import SerialTransport, Transport, UdpTransport

__all__ = [
    "MAX_MOTORS",
    "PROTOCOL_VERSION",
    "CommandMsg",
    "Decoder",
    "Frame",
    "Link",
    "LinkStats",
    "Message",
    "Mode",
    "ModeRequestMsg",
    "MsgType",
    "ProtocolVersionError",
    "SequenceTracker",
    "SerialTransport",
    "StateMsg",
    "Transport",
    "UdpTransport",
    "decode_datagram",
    "encode",
]
