"""A real DNS server on loopback for the tests (dnslib's, in a thread): test zones with SPF, DKIM and DMARC records.

It can be stopped (queries go unanswered: a timeout), started again on the
same port, or told to answer SERVFAIL, the two kinds of DNS trouble.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnslib import QTYPE, RCODE, RR, TXT
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from conftest import free_port
from esmail.config import Address, DnsConfig


class Zones(BaseResolver):
    """Answers from a dict of (name, type) → records; NXDOMAIN for a name it does not know."""

    def __init__(self):
        self.records: dict[tuple[str, str], list] = {}
        self.servfail = False
        self.queries: list[str] = []
        self.ttl = 60  # of every answer

    def resolve(self, request, handler):
        reply = request.reply()
        name, qtype = str(request.q.qname).rstrip(".").lower(), QTYPE[request.q.qtype]
        self.queries.append(f"{name} {qtype}")
        if self.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        for rdata in self.records.get((name, qtype), []):
            reply.add_answer(RR(request.q.qname, request.q.qtype, rdata=rdata, ttl=self.ttl))
        if not any(known == name for known, _ in self.records):
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class DnsServer:
    def __init__(self):
        self.zones = Zones()
        self.port = free_port()
        self.server: DNSServer | None = None

    @property
    def config(self) -> DnsConfig:
        return DnsConfig(nameservers=(Address("127.0.0.1", self.port),), timeout=2.0)

    def txt(self, name: str, text: str) -> None:
        """A TXT record, split into strings of at most 255 bytes as DNS requires."""
        data = text.encode()
        self.zones.records.setdefault((name, "TXT"), []).append(TXT([data[i:i + 255] for i in range(0, len(data), 255)]))

    def start(self) -> "DnsServer":
        self.server = DNSServer(self.zones, address="127.0.0.1", port=self.port, logger=DNSLogger(logf=lambda _: None))
        self.server.start_thread()
        return self

    def stop(self) -> None:
        """Close the port: lookups get no answer."""
        self.server.stop()
        self.server.server.server_close()


def dkim_key(server: DnsServer, domain: str, selector: str = "sel") -> bytes:
    """A new RSA key, its public half published at `{selector}._domainkey.{domain}`; the private key's PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    server.txt(f"{selector}._domainkey.{domain}", "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
