"""The local cluster's DNS (make node-up): names of Services, from the API server.

kubelet's clusterDNS points pods here (10.200.0.1:53, UDP and TCP). It answers, with
authority for the cluster domain:

  <service>.<namespace>.svc.<domain>   A: the Service's ClusterIP, or for a headless
                                       Service the ready addresses of its EndpointSlices
  any other name in <domain>           NXDOMAIN (what the search list tries first)
  anything else                        NXDOMAIN: this cluster reaches no other network,
                                       so nothing is forwarded anywhere

AAAA and other types of a known name get an empty answer (NOERROR). The Services are
listed from the API server every second (a client certificate whose ClusterRole,
made by up.sh, reads Services and EndpointSlices and nothing else), so a new Service resolves within about a second. Python's standard library
only: the node has no registry to pull CoreDNS from, and the e2e suite needs only this.

Usage: dns.py --listen IP --port 53 --server URL --ca CA --cert CRT --key KEY [--domain D]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import urllib.request

TTL = 5
A, AAAA, ANY = 1, 28, 255
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP = 0, 1, 2, 3, 4


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, file=sys.stderr, flush=True)


class Records:
    """name -> list of IPv4 addresses, replaced whole on every successful listing."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.names: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.ready = threading.Event()
        ctx = ssl.create_default_context(cafile=args.ca)
        ctx.load_cert_chain(args.cert, args.key)
        self.opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))

    def get(self, path: str) -> dict:
        with self.opener.open(self.args.server + path, timeout=10) as r:
            return json.load(r)

    def refresh(self) -> None:
        names: dict[str, list[str]] = {}
        headless: dict[tuple[str, str], str] = {}
        for svc in self.get("/api/v1/services")["items"]:
            meta, spec = svc["metadata"], svc.get("spec", {})
            name = f"{meta['name']}.{meta['namespace']}.svc.{self.args.domain}"
            ips = [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")]
                   if ip and ip != "None" and ipaddress.ip_address(ip).version == 4]
            if spec.get("type") == "ExternalName":
                continue
            if ips:
                names[name] = ips
            else:
                headless[(meta["namespace"], meta["name"])] = name
                names[name] = []
        if headless:
            slices = self.get("/apis/discovery.k8s.io/v1/endpointslices")["items"]
            for sl in slices:
                key = (sl["metadata"]["namespace"],
                       sl["metadata"].get("labels", {}).get("kubernetes.io/service-name"))
                if key in headless and sl.get("addressType") == "IPv4":
                    for ep in sl.get("endpoints") or []:
                        if (ep.get("conditions") or {}).get("ready", True):
                            names[headless[key]].extend(ep.get("addresses") or [])
        with self.lock:
            added = sorted(set(names) - set(self.names))
            gone = sorted(set(self.names) - set(names))
            self.names = names
        for n in added:
            log(f"+ {n} {' '.join(names[n]) or '(no address yet)'}")
        for n in gone:
            log(f"- {n}")
        self.ready.set()

    def run(self) -> None:
        failing = False
        while True:
            try:
                self.refresh()
                if failing:
                    log("listing Services works again")
                failing = False
            except Exception as e:  # the API server restarting, a timeout: keep the last
                if not failing:
                    log(f"listing Services failed (keeping the last answers): {e}")
                failing = True
            time.sleep(1)

    def lookup(self, name: str) -> list[str] | None:
        with self.lock:
            return self.names.get(name)


def parse_question(msg: bytes) -> tuple[str, int, int, int]:
    """(name, qtype, qclass, offset after the question) of a query with one question."""
    labels = []
    i = 12
    while True:
        n = msg[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(msg[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    qtype, qclass = struct.unpack("!HH", msg[i : i + 4])
    return ".".join(labels).lower(), qtype, qclass, i + 4


def answer(records: Records, domain: str, msg: bytes) -> bytes | None:
    if len(msg) < 12:
        return None
    ident, flags, qd = struct.unpack("!HHH", msg[:6])
    if flags & 0x8000:  # a response, not a query
        return None
    rd = flags & 0x0100
    opcode = (flags >> 11) & 0xF
    header = lambda rcode, an, aa: struct.pack(  # noqa: E731
        "!HHHHHH", ident, 0x8000 | (opcode << 11) | (0x0400 if aa else 0) | rd | rcode, 1, an, 0, 0)
    try:
        if opcode != 0 or qd != 1:
            raise NotImplementedError
        name, qtype, qclass, end = parse_question(msg)
    except NotImplementedError:
        return struct.pack("!HHHHHH", ident, 0x8000 | (opcode << 11) | rd | NOTIMP, 0, 0, 0, 0)
    except (ValueError, IndexError, struct.error):
        return struct.pack("!HHHHHH", ident, 0x8000 | rd | FORMERR, 0, 0, 0, 0)
    question = msg[12:end]
    ours = name == domain or name.endswith("." + domain)
    ips = records.lookup(name) if ours else None
    if ips is None:
        return header(NXDOMAIN, 0, ours) + question
    rrs = b""
    count = 0
    if qtype in (A, ANY) and qclass == 1:
        for ip in ips:
            rrs += struct.pack("!HHHIH", 0xC00C, A, 1, TTL, 4) + socket.inet_aton(ip)
            count += 1
    return header(NOERROR, count, True) + question + rrs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--server", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--domain", default="cluster.local")
    args = p.parse_args()
    domain = args.domain.strip(".").lower()
    records = Records(args)
    threading.Thread(target=records.run, daemon=True).start()

    class UDP(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            out = answer(records, domain, data)
            if out is not None:
                if len(out) > 512:  # no EDNS here: TC set, no answers; the client asks over TCP
                    flags = struct.unpack("!H", out[2:4])[0] | 0x0200
                    _, _, _, end = parse_question(data)
                    out = out[:2] + struct.pack("!HHHHH", flags, 1, 0, 0, 0) + data[12:end]
                sock.sendto(out, self.client_address)

    class TCP(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while True:
                head = self.rfile.read(2)
                if len(head) < 2:
                    return
                data = self.rfile.read(struct.unpack("!H", head)[0])
                out = answer(records, domain, data)
                if out is None:
                    return
                self.wfile.write(struct.pack("!H", len(out)) + out)

    socketserver.ThreadingUDPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    udp = socketserver.ThreadingUDPServer((args.listen, args.port), UDP)
    tcp = socketserver.ThreadingTCPServer((args.listen, args.port), TCP)
    udp.daemon_threads = tcp.daemon_threads = True
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    log(f"serving {domain} on {args.listen}:{args.port} (UDP, TCP) from {args.server}")
    udp.serve_forever()


if __name__ == "__main__":
    main()
