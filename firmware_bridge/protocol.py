"""Wire format between the robot computer and the motor firmware (docs/firmware_protocol.md).

Every frame is ``header | payload | crc32``, little-endian, packed (no padding):

    magic 0xA5 0x5A | version u8 | type u8 | seq u32 | payload_len u16 | payload | crc32 u32

The envelope (header layout and CRC trailer) is frozen across protocol versions; only the
version number and the payloads change. That lets us CRC-check a frame from another version
and report the mismatch with certainty instead of mistaking it for line noise.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, Union

import numpy as np

PROTOCOL_VERSION = 1
MAGIC = b"\xa5\x5a"
SEQ_MASK = 0xFFFFFFFF  # sequence numbers are uint32 and wrap around
MAX_MOTORS = 128
# Envelope bound: a false sync in line noise never makes the stream decoder wait for more
# than this many payload bytes. Fits a STATE frame with MAX_MOTORS motors (54 + 16 * 128).
MAX_PAYLOAD = 4096

_HEADER = struct.Struct("<2sBBIH")  # magic, version, type, seq, payload_len
_CRC = struct.Struct("<I")
_STATE_FIXED = struct.Struct("<BBIQ")  # n_motors, mode, last_command_seq, timestamp_us
HEADER_SIZE = _HEADER.size  # 10
CRC_SIZE = _CRC.size  # 4
_F32 = np.dtype("<f4")
_IMU_FLOATS = 10  # quaternion wxyz (4) + gyro xyz (3) + accel xyz (3)


class MsgType(IntEnum):
    COMMAND = 1  # computer -> firmware
    STATE = 2  # firmware -> computer
    MODE_REQUEST = 3  # computer -> firmware


class Mode(IntEnum):
    IDLE = 0
    RUNNING = 1
    DAMPING = 2
    ESTOP = 3


class ProtocolVersionError(RuntimeError):
    """An intact frame of another protocol version: the two ends must not run together."""

    def __init__(self, remote: int, local: int = PROTOCOL_VERSION):
        super().__init__(
            f"the other end speaks firmware protocol v{remote}, this bridge speaks v{local}; "
            "update one side so both speak the same version"
        )
        self.remote_version = remote
        self.local_version = local


def _f32(name: str, x, n: int | None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        want = "a 1-D array" if n is None else f"shape ({n},)"
        raise ValueError(f"{name} must have {want}, got shape {a.shape}")
    return a


@dataclass
class CommandMsg:
    """Per-motor PD target; the firmware applies tau = kp*(q_des - q) - kd*dq + torque_ff."""

    position: np.ndarray  # rad
    kp: np.ndarray  # N*m/rad
    kd: np.ndarray  # N*m*s/rad
    torque_ff: np.ndarray  # N*m

    def __post_init__(self):
        self.position = _f32("position", self.position, None)
        n = self.position.shape[0]
        if not 1 <= n <= MAX_MOTORS:
            raise ValueError(f"motor count must be 1..{MAX_MOTORS}, got {n}")
        self.kp = _f32("kp", self.kp, n)
        self.kd = _f32("kd", self.kd, n)
        self.torque_ff = _f32("torque_ff", self.torque_ff, n)


@dataclass
class StateMsg:
    """What the firmware measured, plus what it is doing and which command it last applied."""

    position: np.ndarray  # rad
    velocity: np.ndarray  # rad/s
    torque: np.ndarray  # N*m
    temperature: np.ndarray  # deg C
    quat_wxyz: np.ndarray  # IMU orientation, unit quaternion, w first
    gyro: np.ndarray  # rad/s, IMU frame
    accel: np.ndarray  # m/s^2, IMU frame
    mode: Mode
    last_command_seq: int  # seq of the last COMMAND applied (0 before any)
    timestamp_us: int  # firmware clock, uint64 microseconds

    def __post_init__(self):
        self.position = _f32("position", self.position, None)
        n = self.position.shape[0]
        if not 1 <= n <= MAX_MOTORS:
            raise ValueError(f"motor count must be 1..{MAX_MOTORS}, got {n}")
        self.velocity = _f32("velocity", self.velocity, n)
        self.torque = _f32("torque", self.torque, n)
        self.temperature = _f32("temperature", self.temperature, n)
        self.quat_wxyz = _f32("quat_wxyz", self.quat_wxyz, 4)
        self.gyro = _f32("gyro", self.gyro, 3)
        self.accel = _f32("accel", self.accel, 3)
        self.mode = Mode(self.mode)


@dataclass
class ModeRequestMsg:
    """Ask the firmware to change mode (e.g. ``ModeRequestMsg(Mode.ESTOP)``). Idempotent:
    re-send every tick until ``StateMsg.mode`` confirms it, since any one frame may be lost."""

    mode: Mode

    def __post_init__(self):
        self.mode = Mode(self.mode)


Message = Union[CommandMsg, StateMsg, ModeRequestMsg]


class Frame(NamedTuple):
    seq: int
    msg: Message


@dataclass
class LinkStats:
    """Counters for one receiving end of a link. ``frames_ok`` counts intact frames, including
    duplicates and reordered ones, which are then dropped by sequence checking."""

    frames_ok: int = 0
    bad_crc: int = 0
    bad_version: int = 0
    malformed: int = 0  # bad magic/length, unknown type, inconsistent payload
    gaps: int = 0  # sequence numbers skipped (a late frame filling a gap counts as reordered)
    duplicates: int = 0
    reordered: int = 0  # older than the last accepted frame
    timeouts: int = 0  # episodes of "no valid frame for timeout_s"


# ---------------------------------------------------------------------------- encoding


def _floats(*arrays: np.ndarray) -> bytes:
    return np.concatenate(arrays).astype(_F32, copy=False).tobytes()


def encode(msg: Message, seq: int) -> bytes:
    """One complete frame for ``msg`` with sequence number ``seq`` (0 .. 2**32-1)."""
    if not 0 <= seq <= SEQ_MASK:
        raise ValueError(f"seq must be a uint32, got {seq}")
    if isinstance(msg, CommandMsg):
        mtype = MsgType.COMMAND
        payload = bytes((msg.position.shape[0],)) + _floats(
            msg.position, msg.kp, msg.kd, msg.torque_ff
        )
    elif isinstance(msg, StateMsg):
        mtype = MsgType.STATE
        fixed = _STATE_FIXED.pack(
            msg.position.shape[0], msg.mode, msg.last_command_seq, msg.timestamp_us
        )
        payload = fixed + _floats(
            msg.quat_wxyz, msg.gyro, msg.accel,
            msg.position, msg.velocity, msg.torque, msg.temperature,
        )
    elif isinstance(msg, ModeRequestMsg):
        mtype = MsgType.MODE_REQUEST
        payload = bytes((msg.mode,))
    else:
        raise TypeError(f"cannot encode {type(msg).__name__}")
    body = _HEADER.pack(MAGIC, PROTOCOL_VERSION, mtype, seq, len(payload)) + payload
    return body + _CRC.pack(zlib.crc32(body))


# ---------------------------------------------------------------------------- decoding


def _read_floats(frame, offset: int, count: int) -> np.ndarray:
    # astype copies: the result owns writable native float32 memory, not the wire buffer.
    return np.frombuffer(frame, _F32, count, offset).astype(np.float32)


def _decode_command(frame, plen: int) -> CommandMsg:
    n = frame[HEADER_SIZE]
    if plen != 1 + 16 * n:
        raise ValueError("COMMAND length does not match its motor count")
    a = _read_floats(frame, HEADER_SIZE + 1, 4 * n)
    return CommandMsg(a[:n], a[n : 2 * n], a[2 * n : 3 * n], a[3 * n :])


def _decode_state(frame, plen: int) -> StateMsg:
    if plen < _STATE_FIXED.size:
        raise ValueError("STATE too short")
    n, mode, last_seq, stamp = _STATE_FIXED.unpack_from(frame, HEADER_SIZE)
    if plen != _STATE_FIXED.size + 4 * (_IMU_FLOATS + 4 * n):
        raise ValueError("STATE length does not match its motor count")
    a = _read_floats(frame, HEADER_SIZE + _STATE_FIXED.size, _IMU_FLOATS + 4 * n)
    m = a[_IMU_FLOATS:]
    return StateMsg(
        position=m[:n], velocity=m[n : 2 * n], torque=m[2 * n : 3 * n], temperature=m[3 * n :],
        quat_wxyz=a[0:4], gyro=a[4:7], accel=a[7:10],
        mode=mode, last_command_seq=last_seq, timestamp_us=stamp,
    )


def _decode_mode_request(frame, plen: int) -> ModeRequestMsg:
    if plen != 1:
        raise ValueError("MODE_REQUEST length must be 1")
    return ModeRequestMsg(frame[HEADER_SIZE])


_PAYLOAD_DECODERS = {
    MsgType.COMMAND: _decode_command,
    MsgType.STATE: _decode_state,
    MsgType.MODE_REQUEST: _decode_mode_request,
}


def _crc_ok(frame) -> bool:
    (crc,) = _CRC.unpack_from(frame, len(frame) - CRC_SIZE)
    return zlib.crc32(memoryview(frame)[:-CRC_SIZE]) == crc


def _decode_intact(frame, stats: LinkStats) -> Frame | None:
    """Decode a CRC-valid frame; count and drop anything we cannot interpret."""
    _, version, mtype, seq, plen = _HEADER.unpack_from(frame)
    if version != PROTOCOL_VERSION:
        stats.bad_version += 1
        raise ProtocolVersionError(version)
    decode = _PAYLOAD_DECODERS.get(mtype)
    try:
        if decode is None:
            raise ValueError(f"unknown message type {mtype}")
        msg = decode(frame, plen)
    except ValueError:  # includes out-of-range motor counts and mode bytes
        stats.malformed += 1
        return None
    stats.frames_ok += 1
    return Frame(seq, msg)


def decode_datagram(data: bytes, stats: LinkStats | None = None) -> Frame | None:
    """Decode one datagram holding exactly one frame. Returns None (and counts the reason in
    ``stats``) for anything damaged; raises ProtocolVersionError for another version."""
    stats = stats if stats is not None else LinkStats()
    if len(data) < HEADER_SIZE + CRC_SIZE or data[:2] != MAGIC:
        stats.malformed += 1
        return None
    plen = _HEADER.unpack_from(data)[4]
    if len(data) != HEADER_SIZE + plen + CRC_SIZE:
        stats.malformed += 1
        return None
    if not _crc_ok(data):
        stats.bad_crc += 1
        return None
    return _decode_intact(data, stats)


class Decoder:
    """Byte-stream decoder (serial): feed chunks as they arrive, get whole frames back.

    Resynchronises after garbage by scanning for the magic bytes; after a CRC failure it
    rescans from the byte after the false start, so a real frame hidden inside is not lost.
    """

    def __init__(self, stats: LinkStats | None = None):
        self.stats = stats if stats is not None else LinkStats()
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[Frame]:
        buf = self._buf
        buf += chunk
        frames: list[Frame] = []
        pos = 0
        try:
            while True:
                start = buf.find(MAGIC, pos)
                if start < 0:
                    # Drop garbage, but keep a trailing first magic byte: its pair may follow.
                    pos = max(pos, len(buf) - 1) if buf.endswith(MAGIC[:1]) else len(buf)
                    break
                pos = start
                if len(buf) - pos < HEADER_SIZE:
                    break
                plen = _HEADER.unpack_from(buf, pos)[4]
                if plen > MAX_PAYLOAD:
                    self.stats.malformed += 1
                    pos += 1
                    continue
                end = pos + HEADER_SIZE + plen + CRC_SIZE
                if len(buf) < end:
                    break
                frame = buf[pos:end]  # a copy, so numpy never holds a view into our buffer
                if not _crc_ok(frame):
                    self.stats.bad_crc += 1
                    pos += 1
                    continue
                pos = end  # consumed before decoding, so a version error leaves us consistent
                decoded = _decode_intact(frame, self.stats)
                if decoded is not None:
                    frames.append(decoded)
        finally:
            del buf[:pos]
        return frames
