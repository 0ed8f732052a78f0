#!/usr/bin/env python3
"""An outside client of the provenance pre-flight, for tests/preflight.rs.

It asks `signer.verify.referrers` what a scanner does before publishing jobs, with nothing
of the signer's code: the minting of tests/security/freshness_publisher.py (its own DPoP
key, the OpTok bound to it, the licence, a fresh proof per question, RFC 9449 as the
contract adapts it), then a NATS request per --digest (requestIds <request-id>-0, -1, ...).

Prints one JSON line per answer, in the order asked. Needs nats-py, PyJWT and cryptography.
"""

import argparse
import asyncio
import json
import os
import sys
import time

import nats

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "security"))
from freshness_publisher import Publisher  # noqa: E402


async def main():
    p = argparse.ArgumentParser()
    for name in ["nats", "subject", "tenant", "plan", "issuer", "htu", "repository",
                 "request-id", "authority-key", "authority-kid", "authority-alg",
                 "licensing-key", "licensing-kid", "licensing-alg"]:
        p.add_argument("--" + name, required=True)
    p.add_argument("--digest", action="append", required=True)
    a = p.parse_args()
    a.statement = os.path.join(os.path.dirname(__file__), "..", "docs", "examples", "statement.json")

    client = Publisher(a)
    nc = await nats.connect(a.nats)
    optok = client.optok(600)
    licence = client.licence()
    for i, digest in enumerate(a.digest):
        question = {
            "apiVersion": "signer.stella-ops.org/v1",
            "requestId": f"{a.request_id}-{i}",
            "tenant": a.tenant,
            "auth": {"opTok": optok, "dpop": client.proof(optok, int(time.time()))},
            "poe": {"format": "jwt", "value": licence},
            "repository": a.repository,
            "imageDigest": digest,
        }
        answer = await nc.request(
            a.subject, json.dumps(question).encode(),
            timeout=120, headers={"Content-Type": "application/json"},
        )
        print(json.dumps(json.loads(answer.data)), flush=True)
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
