"""SerialTransport over a real pseudo-terminal pair: raw mode, split frames, resync."""

import array
import fcntl
import os
import termios
import time

import numpy as np
import pytest

from firmware_bridge import (
    CommandMsg, Link, Mode, ModeRequestMsg, SerialTransport, StateMsg, encode,
)


def state(i):
    return StateMsg(np.full(10, i), np.zeros(10), np.zeros(10), np.zeros(10),
                    [1, 0, 0, 0], np.zeros(3), np.zeros(3), Mode.IDLE, i, i)


@pytest.fixture
def pty_link():
    """(Link on the pty's device end, the fd of its other end acting as the firmware)."""
    master, slave = os.openpty()
    transport = SerialTransport(os.ttyname(slave), baudrate=115200)
    os.close(slave)  # the transport opened its own fd by path
    with Link(transport) as link:
        yield link, master
    os.close(master)


def write_and_wait(link, master, data):
    """Write to the firmware end, then wait until the pty has delivered all of it to the
    device end (ptys hand data over asynchronously), so the next poll sees every byte."""
    fd = link.transport.fileno()
    os.write(master, data)
    deadline = time.monotonic() + 2.0
    queued = array.array("i", [0])
    while time.monotonic() < deadline:
        fcntl.ioctl(fd, termios.FIONREAD, queued)
        if queued[0] >= len(data):
            return
        time.sleep(0.001)
    raise TimeoutError("pty did not deliver the bytes")


def read_exactly(fd, n):
    data = b""
    while len(data) < n:
        data += os.read(fd, n - len(data))
    return data


def test_raw_mode_and_baud_are_set(pty_link):
    link, _ = pty_link
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(link.transport.fileno())
    assert not lflag & (termios.ECHO | termios.ICANON | termios.ISIG)
    assert not iflag & (termios.ICRNL | termios.IXON) and not oflag & termios.OPOST
    assert cflag & termios.CSIZE == termios.CS8
    assert ispeed == ospeed == termios.B115200


def test_unsupported_baud_rate():
    with pytest.raises(ValueError, match="123"):
        SerialTransport("/dev/null", baudrate=123)


def test_send_reaches_the_wire_unchanged(pty_link):
    link, master = pty_link
    cmd = CommandMsg(np.linspace(-1, 1, 10), np.full(10, 13.0), np.full(10, 10.0), np.zeros(10))
    link.send(cmd)  # floats contain 0x0a/0x0d bytes: raw mode must not translate them
    link.send(ModeRequestMsg(Mode.ESTOP))
    expected = encode(cmd, 0) + encode(ModeRequestMsg(Mode.ESTOP), 1)
    assert read_exactly(master, len(expected)) == expected


def test_frame_split_across_writes(pty_link):
    link, master = pty_link
    frame = encode(state(3), 0)
    for part in (frame[:1], frame[1:9], frame[9:100]):
        write_and_wait(link, master, part)
        assert link.poll() == []  # incomplete: nothing yet, and not an error
    write_and_wait(link, master, frame[100:])
    got = link.poll()
    assert [m.last_command_seq for m in got] == [3]
    s = link.stats
    assert (s.frames_ok, s.bad_crc, s.malformed) == (1, 0, 0)


def test_garbage_on_the_line_and_newest_wins(pty_link):
    link, master = pty_link
    stream = b"\x00\xff\xa5" + encode(state(1), 0) + b"\xa5\x5a junk" + encode(state(2), 1)
    bad = bytearray(encode(state(9), 2))
    bad[30] ^= 0x10
    stream += bytes(bad) + b"\r\n" + encode(state(4), 3)
    write_and_wait(link, master, stream)
    assert link.recv_latest().last_command_seq == 4
    s = link.stats
    # Two CRC failures: the damaged frame, and the false start "\xa5\x5a junk" whose
    # header borrowed bytes of the next frame (which is then found by rescanning).
    assert (s.frames_ok, s.bad_crc, s.gaps) == (3, 2, 1)
