"""Wire format: round trips, test vectors from the doc, and every way a frame can be bad."""

import struct
import zlib

import numpy as np
import pytest

from firmware_bridge import (
    CommandMsg,
    Decoder,
    LinkStats,
    Mode,
    ModeRequestMsg,
    ProtocolVersionError,
    StateMsg,
    decode_datagram,
    encode,
)

rng = np.random.default_rng(1234)


def random_command(n):
    return CommandMsg(*rng.uniform(-100, 100, (4, n)))


def random_state(n):
    q = rng.standard_normal(4)
    return StateMsg(
        *rng.uniform(-100, 100, (4, n)),
        quat_wxyz=q / np.linalg.norm(q), gyro=rng.standard_normal(3), accel=rng.standard_normal(3),
        mode=Mode(rng.integers(4)), last_command_seq=int(rng.integers(2**32)),
        timestamp_us=int(rng.integers(2**63)),
    )


def assert_same(a, b):
    assert type(a) is type(b)
    for k, va in vars(a).items():
        vb = getattr(b, k)
        if isinstance(va, np.ndarray):
            assert vb.dtype == np.float32
            np.testing.assert_array_equal(va, vb)
        else:
            assert va == vb


def frame_with(version=1, mtype=1, seq=0, payload=b""):
    """Hand-built frame with a valid CRC, to test what the decoder does with odd contents."""
    body = struct.pack("<2sBBIH", b"\xa5\x5a", version, mtype, seq, len(payload)) + payload
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("n", [1, 9, 10, 128])
@pytest.mark.parametrize("make", [random_command, random_state])
def test_round_trip_random(make, n):
    for seq in (0, 1, int(rng.integers(2**32)), 2**32 - 1):
        msg = make(n)
        frame = decode_datagram(encode(msg, seq))
        assert frame.seq == seq
        assert_same(frame.msg, msg)


def test_round_trip_mode_request_and_writable_arrays():
    for mode in Mode:
        assert decode_datagram(encode(ModeRequestMsg(mode), 5)).msg.mode is mode
    msg = decode_datagram(encode(random_command(10), 0)).msg
    msg.kp[0] = 1.0  # decoded arrays own their memory


def test_frame_sizes_follow_motor_count():
    assert len(encode(random_command(10), 0)) == 14 + 1 + 16 * 10
    assert len(encode(random_state(9), 0)) == 14 + 54 + 16 * 9
    assert len(encode(ModeRequestMsg(Mode.ESTOP), 0)) == 14 + 1


def test_doc_test_vectors():
    assert zlib.crc32(b"123456789") == 0xCBF43926
    assert encode(ModeRequestMsg(Mode.ESTOP), 0x01020304) == bytes.fromhex(
        "a5 5a 01 03 04 03 02 01 01 00 03 f2 fb 03 f4")
    cmd = CommandMsg([0.5, -1.0], [20.0, 20.0], [0.5, 0.5], [0.0, 1.5])
    assert encode(cmd, 1) == bytes.fromhex(
        "a5 5a 01 01 01 00 00 00 21 00 02 00 00 00 3f 00 00 80 bf 00 00 a0 41 00 00 a0 41"
        "00 00 00 3f 00 00 00 3f 00 00 00 00 00 00 c0 3f 71 72 de 8c")


def test_state_layout_offsets():
    s = random_state(3)
    p = encode(s, 0)[10:-4]
    assert struct.unpack_from("<BBIQ", p) == (3, s.mode, s.last_command_seq, s.timestamp_us)
    np.testing.assert_array_equal(np.frombuffer(p, "<f4", 4, 14), s.quat_wxyz)
    np.testing.assert_array_equal(np.frombuffer(p, "<f4", 3, 42), s.accel)
    np.testing.assert_array_equal(np.frombuffer(p, "<f4", 3, 54 + 12 * 3), s.temperature)


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="kp"):
        CommandMsg(np.zeros(10), np.zeros(9), np.zeros(10), np.zeros(10))
    with pytest.raises(ValueError, match="motor count"):
        CommandMsg(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="quat"):
        StateMsg(*np.zeros((4, 2)), np.zeros(3), np.zeros(3), np.zeros(3), 0, 0, 0)
    for seq in (-1, 2**32):
        with pytest.raises(ValueError, match="uint32"):
            encode(ModeRequestMsg(Mode.IDLE), seq)


@pytest.mark.parametrize("make", [random_command, random_state])
def test_every_single_byte_corruption_is_dropped_and_counted(make):
    good = encode(make(10), 77)
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0xFF
        stats = LinkStats()
        assert decode_datagram(bytes(bad), stats) is None
        # Magic and length damage read as malformed, everything else fails the CRC.
        assert (stats.malformed, stats.bad_crc) == ((1, 0) if i in (0, 1, 8, 9) else (0, 1))
        assert stats.frames_ok == stats.bad_version == 0

        # Same on a stream: the damaged frame never comes out, the good ones after it do.
        dec = Decoder()
        out = dec.feed(bytes(bad) + encode(make(10), 78) + encode(make(10), 79) + good)
        assert [f.seq for f in out] == [78, 79, 77]
        assert dec.stats.bad_crc + dec.stats.malformed >= (0 if i < 2 else 1)


def test_truncated_frames():
    good = encode(random_state(10), 3)
    for cut in range(len(good)):
        stats = LinkStats()
        assert decode_datagram(good[:cut], stats) is None
        assert stats.malformed == 1
    # On a stream the truncated frame swallows bytes of the next one, fails its CRC, and the
    # decoder resyncs onto the next frame.
    dec = Decoder()
    nxt = encode(random_state(10), 4)
    out = dec.feed(good[: len(good) // 2] + nxt + encode(random_state(10), 5))
    assert [f.seq for f in out] == [4, 5]
    assert dec.stats.bad_crc == 1


def test_datagram_with_trailing_bytes_is_malformed():
    stats = LinkStats()
    assert decode_datagram(encode(random_command(2), 0) + b"\x00", stats) is None
    assert stats.malformed == 1


@pytest.mark.parametrize("payload,mtype", [
    (b"\x01", 9),                                        # unknown type
    (b"\x02" + bytes(16), 1),                            # COMMAND: 2 motors need 33 bytes
    (b"\x00", 1),                                        # COMMAND: 0 motors
    (b"\x07", 3),                                        # MODE_REQUEST: no mode 7
    (b"\x03\x03", 3),                                    # MODE_REQUEST: too long
    (struct.pack("<BBIQ", 1, 9, 0, 0) + bytes(56), 2),   # STATE: no mode 9
    (b"\x01\x00", 2),                                    # STATE: too short
])
def test_intact_but_meaningless_frames_are_malformed(payload, mtype):
    stats = LinkStats()
    assert decode_datagram(frame_with(mtype=mtype, payload=payload), stats) is None
    assert (stats.malformed, stats.bad_crc, stats.frames_ok) == (1, 0, 0)


def test_garbage_between_frames_resyncs():
    frames = [encode(random_command(10), s) for s in range(20)]
    garbage = [rng.integers(0, 256, int(rng.integers(0, 40)), dtype=np.uint8).tobytes()
               for _ in frames]
    garbage[3] = b"\xa5"            # lone first magic byte
    garbage[4] = b"\xa5\x5a\x01"    # false start cut short
    garbage[5] = b"\xa5\x5a\x01\x01\x00\x00\x00\x00\xff\x00" + bytes(300)  # false header
    stream = b"".join(g + f for g, f in zip(garbage, frames))
    for chunk in (1, 7, 64, len(stream)):
        dec = Decoder()
        out = [f for i in range(0, len(stream), chunk) for f in dec.feed(stream[i : i + chunk])]
        assert [f.seq for f in out] == list(range(20))
        assert dec.stats.frames_ok == 20


def test_version_mismatch_is_a_clear_error():
    v2 = frame_with(version=2, mtype=1, payload=bytes(40))
    stats = LinkStats()
    clear = "speaks firmware protocol v2, this bridge speaks v1"
    with pytest.raises(ProtocolVersionError, match=clear) as e:
        decode_datagram(v2, stats)
    assert (e.value.remote_version, e.value.local_version) == (2, 1)
    assert stats.bad_version == 1

    # On a stream the bad frame is consumed before raising, so the caller may keep reading.
    dec = Decoder()
    with pytest.raises(ProtocolVersionError):
        dec.feed(b"\x00" + v2 + encode(ModeRequestMsg(Mode.IDLE), 8))
    assert [f.seq for f in dec.feed(b"")] == [8]
    # A damaged frame claiming another version is line noise, not a version error.
    assert decode_datagram(v2[:-1] + b"\x00", stats) is None
    assert stats.bad_crc == 1
