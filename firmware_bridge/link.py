"""Link: a transport plus sequence numbering, duplicate/reorder filtering and a timeout."""

from __future__ import annotations

import time
from typing import Callable

from .protocol import SEQ_MASK, LinkStats, Message, encode
from .transports import Transport


class SequenceTracker:
    """Accepts only frames newer than the last accepted one, with uint32 wraparound: a
    difference below 2**31 (mod 2**32) is "newer". Counts gaps, duplicates and reordering."""

    def __init__(self, stats: LinkStats):
        self.stats = stats
        self.last: int | None = None

    def accept(self, seq: int) -> bool:
        if self.last is None:
            self.last = seq
            return True
        delta = (seq - self.last) & SEQ_MASK
        if delta == 0:
            self.stats.duplicates += 1
            return False
        if delta > SEQ_MASK >> 1:
            self.stats.reordered += 1  # stale data must never overwrite newer data
            return False
        self.stats.gaps += delta - 1
        self.last = seq
        return True

    def reset(self) -> None:
        self.last = None


class Link:
    """One end of a link. ``send`` numbers outgoing messages; ``poll``/``recv_latest`` return
    only messages newer than anything accepted before. If no valid frame arrives for
    ``timeout_s``, ``timeouts`` is counted once and the link reports ``stale`` until one does.

    After a timeout the sequence tracker forgets the last seq, so a peer that restarted (and
    counts from 0 again) is accepted instead of being dropped as "reordered" for ever.
    A ProtocolVersionError from the transport propagates: the caller must refuse to run.
    """

    def __init__(
        self,
        transport: Transport,
        timeout_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.transport = transport
        self.stats = transport.stats
        self.timeout_s = timeout_s
        self._clock = clock
        self._tracker = SequenceTracker(self.stats)
        self._tx_seq = 0
        self._last_rx: float | None = None
        self._quiet_since = clock()  # start of the current silence, for the timeout check
        self._timed_out = False

    def send(self, msg: Message) -> int:
        """Send ``msg``; returns its sequence number (compare with StateMsg.last_command_seq)."""
        seq = self._tx_seq
        self.transport.send(encode(msg, seq))
        self._tx_seq = (seq + 1) & SEQ_MASK
        return seq

    def poll(self) -> list[Message]:
        """All new messages since the last call, oldest first. Use this where several message
        types share the direction (firmware side), so a mode request is never skipped."""
        now = self._clock()
        msgs = [f.msg for f in self.transport.poll() if self._tracker.accept(f.seq)]
        if msgs:
            self._last_rx = self._quiet_since = now
            self._timed_out = False
        elif not self._timed_out and now - self._quiet_since > self.timeout_s:
            self.stats.timeouts += 1
            self._timed_out = True
            self._tracker.reset()
        return msgs

    def recv_latest(self) -> Message | None:
        """The newest new message, or None; everything older that was queued is discarded so
        a control loop never acts on stale data."""
        msgs = self.poll()
        return msgs[-1] if msgs else None

    @property
    def stale(self) -> bool:
        """True until the first valid frame, and whenever none arrived for ``timeout_s``."""
        return self._last_rx is None or self._clock() - self._last_rx > self.timeout_s

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
