"""Test helpers for sender authentication: keys, an offline DNS stub, signing helpers.

Other tests may reuse these (import after putting this directory on ``sys.path``, as
``tests/mta/test_senderauth.py`` does): no network, keys generated in-process.
"""

from __future__ import annotations

import base64
import hashlib
import random
import time
from dataclasses import dataclass, field

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import parse_pem_private_key

from mta.senderauth import DnsTempError


@dataclass(frozen=True)
class TestKey:
    """A DKIM key: the private key as dkimpy wants it and the DNS TXT record."""

    __test__ = False  # not a pytest class
    algorithm: bytes  # b"rsa-sha256" or b"ed25519-sha256"
    private: bytes
    txt: str


def rsa_key(bits: int) -> TestKey:
    """RSA key of ``bits`` (dkimpy signs with PKCS#1 PEM; DNS gets SubjectPublicKeyInfo)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return TestKey(b"rsa-sha256", pem, f"v=DKIM1; k=rsa; p={base64.b64encode(pub).decode()}")


def ed25519_key() -> TestKey:
    """Ed25519 key (RFC 8463): dkimpy signs with the base64 seed."""
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return TestKey(b"ed25519-sha256", base64.b64encode(seed),
                   f"v=DKIM1; k=ed25519; p={base64.b64encode(pub).decode()}")


@dataclass
class DnsStub:
    """Offline DNS: ``txt`` name -> records; ``other`` (name, qtype) -> values; names in
    ``timeout`` raise :class:`DnsTempError`. Records every query in ``queries``."""

    txt: dict[str, list[str]] = field(default_factory=dict)
    other: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    timeout: set[str] = field(default_factory=set)
    queries: list[str] = field(default_factory=list)

    def add_key(self, selector: str, domain: str, key: TestKey) -> None:
        self.txt[f"{selector}._domainkey.{domain}"] = [key.txt]

    def lookup_txt(self, name: str) -> list[str]:
        name = name.rstrip(".").lower()
        self.queries.append(f"TXT {name}")
        if name in self.timeout:
            raise DnsTempError(f"timeout for {name}")
        return list(self.txt.get(name, []))

    def lookup(self, name: str, qtype: str) -> list[str]:
        name = name.rstrip(".").lower()
        self.queries.append(f"{qtype} {name}")
        if name in self.timeout:
            raise DnsTempError(f"timeout for {name}")
        return list(self.other.get((name, qtype), []))


def message(from_value: str = "Alice <alice@example.com>", body: str = "Hello Bob,\r\n\r\n"
            "the quote is attached.\r\n", extra_headers: str = "",
            message_id: str = "<m1@example.com>", subject: str = "Quote") -> bytes:
    """A plain CRLF test message."""
    return (
        f"{extra_headers}From: {from_value}\r\nTo: Bob <bob@customer.test>\r\n"
        f"Subject: {subject}\r\nDate: Mon, 06 Jan 2025 10:00:00 +0000\r\n"
        f"Message-ID: {message_id}\r\n\r\n{body}"
    ).encode()


def sign(raw: bytes, domain: str, key: TestKey, selector: str = "sel",
         include_headers: list[bytes] | None = None, length: bool = False) -> bytes:
    """Prepend a DKIM-Signature (relaxed/relaxed) made with ``key``."""
    sig = dkim.sign(raw, selector.encode(), domain.encode(), key.private,
                    signature_algorithm=key.algorithm, canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=include_headers or [b"from", b"to", b"subject", b"date",
                                                         b"message-id"],
                    length=length)
    return bytes(sig) + raw


def arc_seal(raw: bytes, domain: str, key: TestKey, srv_id: str, selector: str = "arc",
             timestamp: int | None = None) -> bytes:
    """Prepend an ARC set (dkimpy arc_sign, RSA only) made by ``srv_id``; its AAR is
    copied from the message's A-R headers with authserv-id ``srv_id``."""
    headers = dkim.arc_sign(raw, selector.encode(), domain.encode(), key.private,
                            srv_id.encode(), timestamp=timestamp)
    return b"".join(headers) + raw


def _is_probable_prime(n: int, rng: random.Random) -> bool:
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(32):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def weak_rsa_key(bits: int = 512, seed: int = 512) -> TestKey:
    """An RSA key below 1024 bits, which ``cryptography`` refuses to generate: built from
    our own (deterministic) primes, only to prove such keys are refused (RFC 8301 §3.2)."""
    rng = random.Random(seed)

    def prime(nbits: int) -> int:
        while True:
            c = rng.getrandbits(nbits) | (1 << (nbits - 1)) | (1 << (nbits - 2)) | 1
            if (c - 1) % 65537 and _is_probable_prime(c, rng):
                return c

    p, q = prime(bits // 2), prime(bits // 2)
    e, n = 65537, p * q
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                    rsa.RSAPublicNumbers(e, n))
    key = numbers.private_key(unsafe_skip_rsa_key_validation=True)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return TestKey(b"rsa-sha256", pem, f"v=DKIM1; k=rsa; p={base64.b64encode(pub).decode()}")


def sign_without_from(raw: bytes, domain: str, key: TestKey, selector: str = "sel") -> bytes:
    """A DKIM-Signature whose h= omits From. dkimpy's sign() refuses that (RFC 6376 §5.4
    MUST), so this repeats its steps with the check left out: attackers are not bound by it."""
    signer = dkim.DKIM(raw, signature_algorithm=key.algorithm)
    signer.hasher = hashlib.sha256
    include = (b"to", b"subject", b"date", b"message-id")
    canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    bodyhash = base64.b64encode(hashlib.sha256(canon.canonicalize_body(signer.body)).digest())
    fields = [(b"v", b"1"), (b"a", key.algorithm), (b"c", b"relaxed/relaxed"),
              (b"d", domain.encode()), (b"i", b"@" + domain.encode()), (b"q", b"dns/txt"),
              (b"s", selector.encode()), (b"t", str(int(time.time())).encode()),
              (b"h", b" : ".join(include)), (b"bh", bodyhash), (b"b", b"0" * 60)]
    pk = parse_pem_private_key(key.private)
    return b"DKIM-Signature: " + signer.gen_header(fields, include, canon, b"DKIM-Signature",
                                                  pk) + raw
