"""Transports: move frames over UDP or a serial line, never blocking on receive.

Each transport hides whether its medium carries datagrams or a byte stream: ``poll()``
returns the intact frames that arrived since the last call, in arrival order, and counts
damaged ones in ``stats``. Sequence checking and timeouts live one level up, in ``Link``.
"""

from __future__ import annotations

import os
import select
import socket
import termios
from typing import Protocol

from .protocol import Decoder, Frame, LinkStats, decode_datagram

_MAX_DATAGRAM = 65535


class Transport(Protocol):
    stats: LinkStats

    def send(self, data: bytes) -> None: ...

    def poll(self) -> list[Frame]: ...

    def fileno(self) -> int: ...  # for select()/poll() when a caller wants to wait for data

    def close(self) -> None: ...


class UdpTransport:
    """Non-blocking UDP socket bound to ``bind``; sends to ``peer`` (settable later, so two
    ends on ephemeral ports can learn each other's ``address``)."""

    def __init__(
        self,
        bind: tuple[str, int],
        peer: tuple[str, int] | None = None,
        stats: LinkStats | None = None,
    ):
        self.stats = stats if stats is not None else LinkStats()
        self.peer = peer
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._sock.bind(bind)
        self.address: tuple[str, int] = self._sock.getsockname()

    def send(self, data: bytes) -> None:
        if self.peer is None:
            raise RuntimeError("UdpTransport has no peer to send to")
        self._sock.sendto(data, self.peer)

    def poll(self) -> list[Frame]:
        # Drain everything queued: the caller wants the newest data, not the oldest.
        frames = []
        while True:
            try:
                data = self._sock.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return frames
            frame = decode_datagram(data, self.stats)
            if frame is not None:
                frames.append(frame)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


def _baud_constant(baudrate: int) -> int:
    try:
        return getattr(termios, f"B{baudrate}")
    except AttributeError:
        raise ValueError(f"baud rate {baudrate} is not supported by termios here") from None


class SerialTransport:
    """Serial device (e.g. /dev/ttyUSB0, or a pty in tests) in raw 8N1 mode, no flow control."""

    def __init__(self, device: str, baudrate: int = 1_000_000, stats: LinkStats | None = None):
        speed = _baud_constant(baudrate)
        self._decoder = Decoder(stats)
        self.stats = self._decoder.stats
        self._fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            iflag, oflag, cflag, lflag, _, _, cc = termios.tcgetattr(self._fd)
            # Same as cfmakeraw(3): bytes pass through untouched, no echo, no signals.
            iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                       | termios.INLCR | termios.IGNCR | termios.ICRNL
                       | termios.IXON | termios.IXOFF | termios.IXANY)
            oflag &= ~termios.OPOST
            lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG
                       | termios.IEXTEN)
            cflag &= ~(termios.CSIZE | termios.PARENB | termios.CSTOPB | termios.CRTSCTS)
            cflag |= termios.CS8 | termios.CREAD | termios.CLOCAL
            cc[termios.VMIN] = 0  # reads return what is there, never wait
            cc[termios.VTIME] = 0
            termios.tcsetattr(self._fd, termios.TCSANOW,
                              [iflag, oflag, cflag, lflag, speed, speed, cc])
            termios.tcflush(self._fd, termios.TCIOFLUSH)  # drop bytes from before we opened
        except BaseException:
            os.close(self._fd)
            raise

    def send(self, data: bytes) -> None:
        # A half-written frame would corrupt the stream, so finish it; this only waits when
        # the kernel's output buffer is full, i.e. when frames are sent faster than the baud.
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except BlockingIOError:
                select.select([], [self._fd], [])

    def poll(self) -> list[Frame]:
        frames = []
        while True:
            try:
                chunk = os.read(self._fd, 4096)
            except BlockingIOError:
                return frames
            if not chunk:
                return frames
            frames += self._decoder.feed(chunk)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        os.close(self._fd)
