"""Link over real UDP sockets on 127.0.0.1: newest-wins, sequence filtering, timeouts."""

import socket
import zlib

import numpy as np
import pytest

from firmware_bridge import (
    CommandMsg,
    Link,
    LinkStats,
    Mode,
    ModeRequestMsg,
    ProtocolVersionError,
    SequenceTracker,
    StateMsg,
    UdpTransport,
    encode,
)


def state(i, n=10):
    """A StateMsg whose contents identify it by i."""
    return StateMsg(
        np.full(n, i), np.zeros(n), np.zeros(n), np.full(n, 30.0),
        [1, 0, 0, 0], np.zeros(3), [0, 0, 9.81], Mode.RUNNING, i, 1000 * i,
    )


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def pair():
    """(robot-side Link, firmware-side Link, raw socket aimed at the robot side, clock)."""
    clock = FakeClock()
    robot = UdpTransport(("127.0.0.1", 0))
    fw = UdpTransport(("127.0.0.1", 0), peer=robot.address)
    robot.peer = fw.address
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with Link(robot, timeout_s=0.05, clock=clock) as r, Link(fw, clock=clock) as f:
        yield r, f, lambda data: raw.sendto(data, robot.address), clock
    raw.close()


def test_sequence_tracker_counts_and_wraps():
    stats = LinkStats()
    t = SequenceTracker(stats)
    assert [s for s in [10, 11, 11, 14, 12, 15] if t.accept(s)] == [10, 11, 14, 15]
    assert (stats.gaps, stats.duplicates, stats.reordered) == (2, 1, 1)

    t = SequenceTracker(stats := LinkStats())
    wrap = [2**32 - 2, 2**32 - 1, 0, 1, 3, 2**32 - 1, 3]
    assert [s for s in wrap if t.accept(s)] == [2**32 - 2, 2**32 - 1, 0, 1, 3]
    assert (stats.gaps, stats.duplicates, stats.reordered) == (1, 1, 1)

    # "Newer" means less than half the uint32 range ahead.
    assert not t.accept(3 + 2**31)
    assert stats.reordered == 2
    assert t.accept(3 + 2**31 - 1)
    assert stats.gaps == 1 + 2**31 - 2


def test_command_and_state_over_udp(pair):
    robot, fw, _, _ = pair
    cmd = CommandMsg(np.arange(10), np.full(10, 20), np.full(10, 0.5), np.zeros(10))
    assert robot.send(cmd) == 0
    assert robot.send(ModeRequestMsg(Mode.RUNNING)) == 1
    got = fw.poll()  # firmware side: every message, in order
    assert [type(m) for m in got] == [CommandMsg, ModeRequestMsg]
    np.testing.assert_array_equal(got[0].position, cmd.position)
    fw.send(state(1))
    s = robot.recv_latest()
    assert s.last_command_seq == 1 and s.mode is Mode.RUNNING
    assert robot.stats.frames_ok == 1 and fw.stats.frames_ok == 2


def test_recv_latest_returns_newest_of_queued(pair):
    robot, fw, _, _ = pair
    for i in range(1, 6):
        fw.send(state(i))
    assert robot.recv_latest().last_command_seq == 5
    assert robot.recv_latest() is None  # nothing new: older queued data is gone, not replayed
    assert robot.stats.frames_ok == 5 and robot.stats.gaps == 0


def test_duplicates_gaps_reordering_over_udp(pair):
    robot, _, send_raw, _ = pair
    for seq in [0, 1, 1, 4, 2, 3, 5, 5, 2**31 + 5]:  # the last is half the range away: "older"
        send_raw(encode(state(seq % 1000), seq))
    got = robot.poll()
    assert [m.last_command_seq for m in got] == [0, 1, 4, 5]
    s = robot.stats
    assert (s.frames_ok, s.duplicates, s.gaps, s.reordered) == (9, 2, 2, 3)
    # Newest-wins must not let a late frame win.
    send_raw(encode(state(7), 7))
    send_raw(encode(state(6), 6))
    assert robot.recv_latest().last_command_seq == 7


def test_sequence_wraparound_over_udp(pair):
    robot, _, send_raw, _ = pair
    for tag, seq in enumerate([2**32 - 2, 2**32 - 1, 0, 2, 2**32 - 1]):
        send_raw(encode(state(tag), seq))
    assert [m.last_command_seq for m in robot.poll()] == [0, 1, 2, 3]  # tags, not seqs
    assert (robot.stats.gaps, robot.stats.reordered) == (1, 1)


def test_garbage_datagrams_are_counted(pair):
    robot, _, send_raw, _ = pair
    send_raw(b"hello")
    frame = bytearray(encode(state(1), 0))
    frame[20] ^= 1
    send_raw(bytes(frame))
    send_raw(encode(state(2), 1))
    assert [m.last_command_seq for m in robot.poll()] == [2]
    assert (robot.stats.malformed, robot.stats.bad_crc) == (1, 1)


def test_timeout_and_stale(pair):
    robot, fw, send_raw, clock = pair
    assert robot.stale  # nothing received yet
    fw.send(state(1))
    assert robot.recv_latest() is not None and not robot.stale
    clock.t = 0.04
    assert robot.recv_latest() is None and not robot.stale and robot.stats.timeouts == 0
    clock.t = 0.06
    assert robot.stale
    for _ in range(3):  # one episode counts once, however often we look
        robot.poll()
    assert robot.stats.timeouts == 1
    # A rebooted firmware restarts at seq 0: accepted because the timeout reset the tracker.
    send_raw(encode(state(9), 0))
    assert robot.recv_latest().last_command_seq == 9 and not robot.stale
    clock.t = 0.2
    robot.poll()
    assert robot.stats.timeouts == 2 and robot.stale


def test_version_mismatch_surfaces_from_link(pair):
    robot, _, send_raw, _ = pair
    frame = bytearray(encode(state(1), 0))
    frame[2] = 2
    frame[-4:] = zlib.crc32(frame[:-4]).to_bytes(4, "little")
    send_raw(bytes(frame))
    with pytest.raises(ProtocolVersionError, match="v2, this bridge speaks v1"):
        robot.recv_latest()
    assert robot.stats.bad_version == 1
