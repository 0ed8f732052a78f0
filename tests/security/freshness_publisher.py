#!/usr/bin/env python3
"""An outside publisher of signing jobs, for tests/security/freshness.rs.

It does what a scanner does, with nothing of the signer's code: it makes its own DPoP key
(Ed25519), mints the OpTok bound to that key (`cnf.jkt`, RFC 7638 thumbprint) and a licence
with the Authority's and the licensing service's private keys (the test plays those two),
mints a fresh DPoP proof (RFC 9449 as the signer's contract adapts it: htm PUBLISH, htu,
ath, iat, jti) for every job just before publishing it, and publishes to JetStream with
`Nats-Msg-Id` = requestId, waiting for every PubAck.

Jobs (all for one tenant):
  --count N --prefix P   N good jobs, requestIds P0 .. P<N-1>, sharing one OpTok
  --stale ID             one job whose proof was already stale when published
                         (iat = now - --stale-age seconds)
  --short-token ID       one job whose own OpTok expires --short-token-ttl seconds after
                         it is published

Prints one JSON line: {"published": n, "first": unix_s, "last": unix_s}.
Needs nats-py, PyJWT and cryptography.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import secrets
import time

import jwt
import nats
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Publisher:
    def __init__(self, a):
        self.a = a
        self.authority_key = open(a.authority_key).read()
        self.licensing_key = open(a.licensing_key).read()
        self.proof_key = Ed25519PrivateKey.generate()
        raw = self.proof_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.proof_jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
        # RFC 7638: the required members in lexicographic order, no whitespace.
        canonical = json.dumps(self.proof_jwk, sort_keys=True, separators=(",", ":"))
        self.jkt = b64url(hashlib.sha256(canonical.encode()).digest())
        self.statement = json.load(open(a.statement))

    def optok(self, ttl: int) -> str:
        t = int(time.time())
        claims = {
            "iss": self.a.issuer,
            "sub": "svc:python-scanner",
            "aud": ["signer"],
            "scope": "signer.sign",
            "tid": self.a.tenant,
            "iat": t,
            "nbf": t,
            "exp": t + ttl,
            "cnf": {"jkt": self.jkt},
        }
        return jwt.encode(
            claims, self.authority_key, algorithm=self.a.authority_alg,
            headers={"kid": self.a.authority_kid},
        )

    def licence(self) -> str:
        t = int(time.time())
        claims = {
            "tid": self.a.tenant,
            "plan": self.a.plan,
            "features": ["signer.sign"],
            "iat": t,
            "exp": t + 3600,
        }
        return jwt.encode(
            claims, self.licensing_key, algorithm=self.a.licensing_alg,
            headers={"kid": self.a.licensing_kid},
        )

    def proof(self, optok: str, iat: int) -> str:
        claims = {
            "htm": "PUBLISH",
            "htu": self.a.htu,
            "ath": b64url(hashlib.sha256(optok.encode()).digest()),
            "iat": iat,
            "jti": secrets.token_hex(16),
        }
        return jwt.encode(
            claims, self.proof_key, algorithm="EdDSA",
            headers={"typ": "dpop+jwt", "jwk": self.proof_jwk},
        )

    def request(self, request_id: str, optok: str, proof: str, licence: str) -> bytes:
        statement = json.loads(json.dumps(self.statement))
        statement["predicate"]["requestId"] = request_id
        return json.dumps({
            "apiVersion": "signer.stella-ops.org/v1",
            "requestId": request_id,
            "tenant": self.a.tenant,
            "kind": "dsse",
            "auth": {"opTok": optok, "dpop": proof},
            "poe": {"format": "jwt", "value": licence},
            "scanner": {
                "repository": "localhost/stella-ops/scanner",
                "imageDigest": "sha256:" + "1" * 64,
            },
            "statement": statement,
        }).encode()


async def main():
    p = argparse.ArgumentParser()
    for name in ["nats", "subject", "tenant", "plan", "issuer", "htu", "statement",
                 "authority-key", "authority-kid", "authority-alg",
                 "licensing-key", "licensing-kid", "licensing-alg"]:
        p.add_argument("--" + name, required=True)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--prefix", default="job-")
    p.add_argument("--stale")
    p.add_argument("--stale-age", type=int, default=6)
    p.add_argument("--short-token")
    p.add_argument("--short-token-ttl", type=int, default=2)
    a = p.parse_args()

    pub = Publisher(a)
    nc = await nats.connect(a.nats)
    js = nc.jetstream()
    optok = pub.optok(600)  # one token for all the good jobs, as publishers reuse it
    licence = pub.licence()
    times = []

    async def publish(request_id: str, body: bytes):
        ack = await js.publish(a.subject, body, headers={"Nats-Msg-Id": request_id})
        if ack.duplicate:
            raise SystemExit(f"{request_id}: stored as a duplicate")
        times.append(time.time())

    # Batches of concurrent publishes; every proof is minted just before its job is sent.
    batch = []
    for i in range(a.count):
        rid = f"{a.prefix}{i}"
        body = pub.request(rid, optok, pub.proof(optok, int(time.time())), licence)
        batch.append(publish(rid, body))
        if len(batch) == 64:  # small batches: a proof is sent within moments of its iat
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)

    if a.stale:
        body = pub.request(a.stale, optok, pub.proof(optok, int(time.time()) - a.stale_age), licence)
        await publish(a.stale, body)
    if a.short_token:
        short = pub.optok(a.short_token_ttl)
        body = pub.request(a.short_token, short, pub.proof(short, int(time.time())), licence)
        await publish(a.short_token, body)

    await nc.drain()
    print(json.dumps({"published": len(times), "first": min(times, default=0),
                      "last": max(times, default=0)}))


if __name__ == "__main__":
    asyncio.run(main())
