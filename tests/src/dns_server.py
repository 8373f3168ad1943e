"""A real DNS server for the tests: dnslib's DNSServer (PyPI `dnslib`, nobody here wrote it)
answering A/AAAA queries (or SERVFAIL, for a record of that type; a `*.<domain>` name
answers every name under the domain) from a JSON file re-read on every query, so a test changes an
answer by rewriting the file. Binds 127.0.0.1 port 0 (UDP), prints the port, appends every
query name to `<records>.queries`, and stops when its stdin closes."""
import json
import sys

from dnslib import AAAA, QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class FileResolver(BaseResolver):
    def __init__(self, path):
        self.path = path

    def resolve(self, request, handler):
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        with open(self.path + ".queries", "a") as log:
            log.write(f"{qname} {QTYPE[request.q.qtype]}\n")
        with open(self.path) as f:
            records = json.load(f)
        known = False
        for r in records:
            name = r["name"].lower()
            # "*.<domain>" answers every name under the domain.
            if name != qname and not (name.startswith("*.") and qname.endswith(name[1:])):
                continue
            known = True
            if r["type"] == "SERVFAIL":
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            if r["type"] == "A" and request.q.qtype == QTYPE.A:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(r["ip"]), ttl=r["ttl"]))
            if r["type"] == "AAAA" and request.q.qtype == QTYPE.AAAA:
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(r["ip"]), ttl=r["ttl"]))
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


server = DNSServer(
    FileResolver(sys.argv[1]),
    port=0,
    address="127.0.0.1",
    logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data", False),
)
server.start_thread()
print(server.server.server_address[1], flush=True)
sys.stdin.read()
server.stop()
