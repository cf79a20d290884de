"""Firmware bodies sent by a child process: `otabox download-sender`, started by the server.

On the event loop, `sendfile` copies as much as the socket takes per call and MQTT waits behind
it (p99 round trip 79 ms during 20 downloads). In threads of the server the kernel copy leaves
the loop free, but the threads still share its GIL and its CPU time: on a busy 2-core machine MQTT
p99 stayed at 40-50 ms (bench/RESULTS.md). In a process of their own they share neither. The
server hands each download over as two descriptors (the client's socket and the open file, by
SCM_RIGHTS on a Unix socket pair) with the range to send, and gets back one reply per download.

Messages, parent to child: `S` id offset count (+ 2 fds) to send, `C` id to give up on one.
Child to parent: id status sent, status 0 done, 1 the client went away or stalled, 2 an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

# Downloads sent at once; more wait their turn in the child (a queued device just waits).
SENDER_THREADS = 32
# One sendfile call copies at most this much, so a cancel or a stop is noticed soon.
SEND_CHUNK = 4 * 1024 * 1024
# A client that takes nothing for this long is dropped, freeing its sender.
STALL_SECONDS = 60.0
# The child yields the CPU to the server's event loop when both want it; no lock is shared, so
# a niced sender can never hold up the loop (as a niced thread holding the GIL would).
SENDER_NICE = 10

_SEND = struct.Struct("!cQQQ")
_CANCEL = struct.Struct("!cQ")
_REPLY = struct.Struct("!QBQ")
DONE, GONE, FAILED = 0, 1, 2


class SenderGone(ConnectionResetError):
    """The client went away, stalled, or the sender could not send (the connection is done for)."""


def command(fd: int, stall_seconds: float) -> list[str]:
    """`otabox download-sender --fd N` from a source install or the one-file binary."""
    head = [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "otabox"]
    return [*head, "download-sender", "--fd", str(fd), "--stall-seconds", str(stall_seconds)]


# ---------------------------------------------------------------- the server's side


class SenderProcess:
    """The child and the downloads handed to it. Unusable (`alive` False) once the child is gone:
    downloads then take aiohttp's own path on the event loop."""

    def __init__(self) -> None:
        self._chan: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending: dict[int, asyncio.Future[tuple[int, int]]] = {}
        self._next = 0
        self.active = 0  # bodies being sent right now
        self.sent_bytes = 0  # by the child, since start

    @property
    def alive(self) -> bool:
        return self._chan is not None

    def start(self) -> None:
        """Raises OSError when the child cannot be started."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                command(theirs.fileno(), STALL_SECONDS), pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._chan = ours
        asyncio.get_running_loop().add_reader(ours, self._on_replies)

    async def close(self) -> None:
        """Stop the child (it gives up every download at its next chunk) and wait for it."""
        chan, self._chan = self._chan, None
        if chan is not None:
            asyncio.get_running_loop().remove_reader(chan)
            chan.close()  # the child reads end-of-file and exits
        self._fail_all("the server is stopping")
        if self._proc is not None:
            try:
                await asyncio.to_thread(self._proc.wait, 10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                await asyncio.to_thread(self._proc.wait)

    async def send(self, sock: socket.socket, file_fd: int, offset: int, count: int) -> None:
        """Send `count` bytes of the file from `offset` to `sock`; returns when they are sent.

        The caller must keep the loop off `sock` meanwhile (reading paused, nothing written).
        Raises SenderGone.
        """
        if self._chan is None:
            raise SenderGone("the download sender is not running")
        self._next += 1
        msg_id = self._next
        fut: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        self.active += 1
        try:
            await self._post(_SEND.pack(b"S", msg_id, offset, count), [sock.fileno(), file_fd])
            status, sent = await fut
            self.sent_bytes += sent
            if status != DONE:
                raise SenderGone("client went away or stalled" if status == GONE else "the sender failed")
        except asyncio.CancelledError:
            if msg_id in self._pending and self._chan is not None:
                with contextlib.suppress(OSError):
                    self._chan.send(_CANCEL.pack(b"C", msg_id))
            raise
        finally:
            self._pending.pop(msg_id, None)
            self.active -= 1

    async def _post(self, data: bytes, fds: list[int]) -> None:
        while True:
            assert self._chan is not None
            try:
                socket.send_fds(self._chan, [data], fds)
                return
            except BlockingIOError:  # the child is behind on its mail: wait a moment
                await asyncio.sleep(0.001)

    def _on_replies(self) -> None:
        assert self._chan is not None
        while True:
            try:
                data = self._chan.recv(_REPLY.size)
            except BlockingIOError:
                return
            except OSError as exc:
                data, reason = b"", str(exc)
            else:
                reason = "it exited"
            if not data:
                log.error("the download sender process stopped (%s): downloads go on from the event loop", reason)
                asyncio.get_running_loop().remove_reader(self._chan)
                self._chan.close()
                self._chan = None
                self._fail_all("the download sender stopped")
                return
            msg_id, status, sent = _REPLY.unpack(data)
            fut = self._pending.get(msg_id)
            if fut is not None and not fut.done():
                fut.set_result((status, sent))

    def _fail_all(self, why: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(SenderGone(why))


# ---------------------------------------------------------------- the child


def child_main(fd: int, stall_seconds: float) -> int:
    """The child's loop: one thread per download (up to SENDER_THREADS), until the parent goes."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, SENDER_NICE)
    chan = socket.socket(fileno=fd)
    chan.setblocking(True)
    stop = threading.Event()
    cancelled: set[int] = set()
    lock = threading.Lock()  # replies from many threads onto one socket
    pool = ThreadPoolExecutor(max_workers=SENDER_THREADS, thread_name_prefix="send")

    def reply(msg_id: int, status: int, sent: int) -> None:
        with lock, contextlib.suppress(OSError):
            chan.send(_REPLY.pack(msg_id, status, sent))

    def run(msg_id: int, sock_fd: int, file_fd: int, offset: int, count: int) -> None:
        try:
            sent, status = 0, DONE
            if not (stop.is_set() or msg_id in cancelled):
                sent, status = send_blocking(
                    sock_fd, file_fd, offset, count, stall_seconds, lambda: stop.is_set() or msg_id in cancelled
                )
            else:
                status = GONE
        except Exception:  # the parent is told; the child must keep serving
            status = FAILED
        finally:
            os.close(sock_fd)
            os.close(file_fd)
            cancelled.discard(msg_id)
        reply(msg_id, status, sent)

    try:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(chan, 64, 2)
            except InterruptedError:
                continue
            if not data:
                return 0  # the server closed its end: it is stopping or gone
            if data[:1] == b"S" and len(fds) == 2:
                _, msg_id, offset, count = _SEND.unpack(data)
                pool.submit(run, msg_id, fds[0], fds[1], offset, count)
            elif data[:1] == b"C":
                cancelled.add(_CANCEL.unpack(data)[1])
            else:
                for extra in fds:
                    os.close(extra)
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def send_blocking(
    sock_fd: int, file_fd: int, offset: int, count: int, stall_seconds: float, give_up: Callable[[], bool]
) -> tuple[int, int]:
    """Blocking sendfile in chunks with a send timeout; returns (bytes sent, status).

    Blocking: one sendfile call per chunk rather than one per "socket buffer full". The
    socket's file status (O_NONBLOCK) is shared with the server's descriptor, which does not
    touch the socket meanwhile and gets it back non-blocking.
    """
    os.set_blocking(sock_fd, True)
    seconds = int(stall_seconds)
    sock = socket.socket(fileno=os.dup(sock_fd))
    sent_total = 0
    try:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, int((stall_seconds - seconds) * 1e6))
        )
        while count > 0:
            if give_up():
                return sent_total, GONE
            try:
                sent = os.sendfile(sock_fd, file_fd, offset, min(count, SEND_CHUNK))
            except (BlockingIOError, BrokenPipeError, ConnectionError):  # timed out, or gone
                return sent_total, GONE
            if sent == 0:
                return sent_total, GONE
            offset += sent
            count -= sent
            sent_total += sent
        return sent_total, DONE
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
            os.set_blocking(sock_fd, False)
        sock.close()
