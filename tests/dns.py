"""A real DNS server on 127.0.0.1 for the discovery tests: UDP and TCP on one port, answers the
tests change while it runs.

It runs in a thread of its own, so it keeps answering while the test's event loop is blocked
(a proxy started as a subprocess and waited for with time.sleep). dnslib parses and encodes the
messages; everything else (records, failures, truncation) is decided here.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import threading
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSRecord

TTL = 1
UDP_LIMIT = 512  # RFC 1035 §4.2.1, raised by a query's EDNS0 OPT record (RFC 6891 §6.2.5)


def _key(name: str) -> str:
    return str(name).lower().rstrip(".")


class DnsServer:
    """`with DnsServer() as dns:` (or `async with`); `dns.address` goes into discovery.resolver.

    Unknown names answer NXDOMAIN, known names without the asked type an empty NOERROR. Set
    `fail` to answer SERVFAIL (or add names to `fail_names`), `silent` to drop queries,
    `additional = False` to leave the addresses of SRV targets out of the additional section.
    """

    def __init__(self) -> None:
        self.fail = False
        self.fail_names: set[str] = set()  # SERVFAIL for these names only (no final dot)
        self.silent = False
        self.additional = True
        self.queries: list[tuple[str, str]] = []  # (name without final dot, type), as asked
        self.tcp_queries = 0
        self._records: dict[str, dict[str, list[Any]]] = {}
        self._lock = threading.Lock()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._port = 0  # kept after stop(), for messages
        self._thread: threading.Thread | None = None
        self._wake_read: socket.socket | None = None  # a byte here stops the thread
        self._wake_write: socket.socket | None = None

    # --- what the tests change ---

    def set_a(self, name: str, addresses: list[str]) -> None:
        self._set(name, "A", [A(address) for address in addresses])

    def set_aaaa(self, name: str, addresses: list[str]) -> None:
        self._set(name, "AAAA", [AAAA(address) for address in addresses])

    def set_srv(self, name: str, records: list[tuple[int, int, int, str]]) -> None:
        """`records`: (priority, weight, port, "target.host.")."""
        srv = [SRV(priority=p, weight=w, port=port, target=t) for p, w, port, t in records]
        self._set(name, "SRV", srv)

    def remove(self, name: str) -> None:
        with self._lock:
            self._records.pop(_key(name), None)

    def _set(self, name: str, kind: str, rdata: list[Any]) -> None:
        with self._lock:
            self._records.setdefault(_key(name), {})[kind] = rdata

    # --- where it listens ---

    @property
    def port(self) -> int:
        assert self._port, "the server is not started"
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> DnsServer:
        for _ in range(50):  # TCP on the port the kernel gave UDP; another may hold it
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind(("127.0.0.1", udp.getsockname()[1]))
            except OSError as exc:
                udp.close()
                tcp.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            tcp.listen(16)
            self._udp, self._tcp, self._port = udp, tcp, int(udp.getsockname()[1])
            break
        else:
            raise OSError("no port free for both UDP and TCP")
        self._wake_read, self._wake_write = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="test DNS server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None and self._wake_write is not None:
            self._wake_write.send(b"x")
            self._thread.join(5)
            assert not self._thread.is_alive(), "the DNS server thread did not stop"
            self._thread = None
        for sock in (self._udp, self._tcp, self._wake_read, self._wake_write):
            if sock is not None:
                sock.close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> DnsServer:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()  # a join of well under a second: the thread wakes on _wake_read

    # --- the server thread ---

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None and self._wake_read is not None
        buffers: dict[socket.socket, bytes] = {}
        with selectors.DefaultSelector() as selector:
            for sock in (self._udp, self._tcp, self._wake_read):
                selector.register(sock, selectors.EVENT_READ)
            try:
                while True:
                    for ready, _ in selector.select():
                        sock = ready.fileobj
                        assert isinstance(sock, socket.socket)
                        if sock is self._wake_read:
                            return
                        if sock is self._udp:
                            self._udp_query()
                        elif sock is self._tcp:
                            connection, _ = self._tcp.accept()
                            buffers[connection] = b""
                            selector.register(connection, selectors.EVENT_READ)
                        elif not self._tcp_read(sock, buffers):
                            selector.unregister(sock)
                            del buffers[sock]
                            sock.close()
            finally:
                for connection in buffers:
                    connection.close()

    def _udp_query(self) -> None:
        assert self._udp is not None
        data, peer = self._udp.recvfrom(65535)
        reply = self._answer(data)
        if reply is None:
            return
        limit = UDP_LIMIT
        query = DNSRecord.parse(data)
        for rr in query.ar:
            if rr.rtype == QTYPE.OPT:
                limit = max(limit, rr.rclass)
        packed = reply.pack()
        if len(packed) > limit:
            cut = query.reply()  # the question alone, with TC set: ask again over TCP
            cut.header.tc = 1
            packed = cut.pack()
        self._udp.sendto(packed, peer)

    def _tcp_read(self, connection: socket.socket, buffers: dict[socket.socket, bytes]) -> bool:
        """Answer each whole length-prefixed query (RFC 1035 §4.2.2); False once it closed."""
        try:
            chunk = connection.recv(65535)
        except ConnectionError:
            return False
        if not chunk:
            return False
        data = buffers[connection] + chunk
        while len(data) >= 2 and len(data) >= 2 + struct.unpack("!H", data[:2])[0]:
            size = struct.unpack("!H", data[:2])[0]
            message, data = data[2 : 2 + size], data[2 + size :]
            self.tcp_queries += 1
            reply = self._answer(message)
            if reply is not None:
                packed = reply.pack()
                with contextlib.suppress(ConnectionError):
                    connection.sendall(struct.pack("!H", len(packed)) + packed)
        buffers[connection] = data
        return True

    def _answer(self, data: bytes) -> DNSRecord | None:
        try:
            query = DNSRecord.parse(data)
        except Exception:  # not a DNS message: drop it, as a server would
            return None
        name, kind = _key(str(query.q.qname)), QTYPE[query.q.qtype]
        self.queries.append((name, kind))
        if self.silent:
            return None
        reply = query.reply()
        if self.fail or name in self.fail_names:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        with self._lock:
            records = self._records.get(name)
            if records is None:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            for rdata in records.get(kind, []):
                reply.add_answer(RR(query.q.qname, getattr(QTYPE, kind), rdata=rdata, ttl=TTL))
                if kind == "SRV" and self.additional:
                    self._add_addresses(reply, str(rdata.target))
        return reply

    def _add_addresses(self, reply: DNSRecord, target: str) -> None:
        for kind, rdata in self._records.get(_key(target), {}).items():
            if kind in ("A", "AAAA"):
                for address in rdata:
                    reply.add_ar(RR(target, getattr(QTYPE, kind), rdata=address, ttl=TTL))
