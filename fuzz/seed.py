#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into fuzz/seeds/<target>/ from the
repository's own examples (schemas/examples, tests/golden, docs/examples) plus a few
hand-made shapes the examples lack (tokens, JWKS, OCI manifests, control commands).

The committed corpus (fuzz/corpus/<target>/) is these seeds plus what the fuzzer found,
minimised with `cargo fuzz cmin`; rerun this only to add seeds. Standard library only (a
small CBOR encoder is below: CBOR bodies are the JSON examples in the other encoding).
"""

import base64
import hashlib
import json
import pathlib
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "fuzz" / "seeds"

# Must match fuzz/src (DIGEST_HEX, JWS_NOW, ISSUER, AUDIENCE, SCOPE, HTU, PROOF_OPTOK).
DIGEST_HEX = "0b14ca2bf1d47f9cfe0b4ae1a4e0fcfd4c6e10f9dd6e45c8f1c4a3b7a2e9d1c0"
NOW = 1_800_000_000
ISSUER = "https://authority.fuzz"
AUDIENCE = "stella-signer"
SCOPE = "signer:sign"
HTU = "nats://signer.fuzz/sign.requests"
PROOF_OPTOK = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJmdXp6In0.c2ln"
INTOTO = "application/vnd.in-toto+json"


def cbor(v):
    def head(major, n):
        if n < 24:
            return bytes([major << 5 | n])
        for add, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
            if n < 1 << (8 * struct.calcsize(fmt)):
                return bytes([major << 5 | add]) + struct.pack(fmt, n)
        raise ValueError(n)

    if v is None:
        return b"\xf6"
    if v is True:
        return b"\xf5"
    if v is False:
        return b"\xf4"
    if isinstance(v, int):
        return head(0, v) if v >= 0 else head(1, -1 - v)
    if isinstance(v, float):
        return b"\xfb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        return head(3, len(b)) + b
    if isinstance(v, bytes):
        return head(2, len(v)) + v
    if isinstance(v, list):
        return head(4, len(v)) + b"".join(cbor(x) for x in v)
    if isinstance(v, dict):
        return head(5, len(v)) + b"".join(cbor(k) + cbor(x) for k, x in v.items())
    raise TypeError(type(v))


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def compact(header, claims, sig=b"\x00" * 64):
    return ".".join(
        [b64url(json.dumps(header).encode()), b64url(json.dumps(claims).encode()), b64url(sig)]
    )


def write(target, name, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def jdump(v):
    return json.dumps(v, separators=(",", ":")).encode()


def statement(digest=DIGEST_HEX, type_="https://in-toto.io/Statement/v1"):
    return {
        "_type": type_,
        "subject": [{"name": "registry.example/stella-ops/scanner", "digest": {"sha256": digest}}],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {"builder": {"id": "https://ci.example"}},
    }


def requests():
    for p in sorted((ROOT / "schemas/examples/request").glob("*.json")):
        body = p.read_bytes()
        write("request_json", p.stem, body)
        write("request_cbor", p.stem, cbor(json.loads(body)))


def jws():
    ed = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    ec = {
        "kty": "EC",
        "crv": "P-256",
        "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
        "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM",
    }
    optok = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "scope": SCOPE + " other",
        "sub": "alice",
        "tid": "acme",
        "exp": NOW + 600,
        "nbf": NOW - 10,
        "iat": NOW - 10,
        "cnf": {"jkt": "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"},
    }
    licence = {"tid": "acme", "plan": "pro", "features": ["sign"], "exp": NOW + 3600, "nbf": NOW - 1}
    ath = b64url(hashlib.sha256(PROOF_OPTOK.encode()).digest())
    proof = {"htm": "PUBLISH", "htu": HTU, "iat": NOW, "jti": "j-1", "ath": ath}
    # 0: raw tokens (bad signatures; the verifiers' parsing and key choice).
    write("jws", "raw-optok", b"\x00" + compact({"alg": "EdDSA", "typ": "JWT", "kid": "k"}, optok).encode())
    write("jws", "raw-es256", b"\x00" + compact({"alg": "ES256", "kid": "k"}, licence).encode())
    write("jws", "raw-dpop", b"\x00" + compact({"alg": "EdDSA", "typ": "dpop+jwt", "jwk": ed}, proof).encode())
    write("jws", "raw-none", b"\x00" + compact({"alg": "none"}, optok, b"x").encode())
    # 1-3: header 0xFF claims, signed by the target.
    write("jws", "signed-optok", b"\x01" + jdump({"typ": "JWT"}) + b"\xff" + jdump(optok))
    write("jws", "signed-optok-aud-list", b"\x01" + jdump({}) + b"\xff" + jdump(dict(optok, aud=["x", AUDIENCE], exp=NOW + 0.5)))
    write("jws", "signed-licence", b"\x02" + jdump({"typ": "JWT"}) + b"\xff" + jdump(licence))
    write("jws", "signed-licence-revoked", b"\x02" + jdump({}) + b"\xff" + jdump(dict(licence, revoked=True)))
    write("jws", "signed-dpop", b"\x03" + jdump({"typ": "dpop+jwt"}) + b"\xff" + jdump(proof))
    # 4: JWKS documents.
    write("jws", "jwks", b"\x04" + jdump({"keys": [dict(ed, kid="a", alg="EdDSA", use="sig"), dict(ec, kid="b", alg="ES256")]}))
    write("jws", "jwk", b"\x04" + jdump(ec))


def control():
    keyid = "ab" * 32
    for name, command in [
        ("revoke", {"action": "revoke", "keyid": keyid, "reason": "leaked"}),
        ("revoke-identity", {"action": "revoke-identity", "issuer": "https://issuer", "san": "ci@example"}),
        ("rotate", {"action": "rotate", "profile": "default", "tenant": "acme", "keys": [keyid]}),
        ("restore", {"action": "restore", "profile": "default", "plan": "pro", "reason": "done"}),
    ]:
        sig = compact({"alg": "EdDSA", "kid": "op-1", "typ": "JWT"}, {"sub": "op", "jti": "1", "digest": "x"})
        write("control", name, jdump({"command": command, "signatures": [sig]}))


def dsse():
    golden = (ROOT / "tests/golden/ed25519.envelope.json").read_bytes()
    write("dsse", "golden-envelope", b"\x00" + golden)
    write("dsse", "signed-statement", b"\x01" + jdump(statement()))
    write("dsse", "signed-statement-v01", b"\x01" + jdump(statement(type_="https://in-toto.io/Statement/v0.1")))
    write("dsse", "signed-statement-other-digest", b"\x01" + jdump(statement("ff" * 32)))
    write("dsse", "signed-golden-statement", b"\x01" + (ROOT / "tests/golden/statement.json").read_bytes())
    write("dsse", "signed-other-type", b"\x03text/plain\nhello")
    env = {"payload": base64.b64encode(jdump(statement())).decode(), "payloadType": INTOTO,
           "signatures": [{"keyid": "", "sig": base64.b64encode(b"\x01" * 64).decode()}] * 3}
    write("dsse", "three-signatures", b"\x00" + jdump(env))


def bundle():
    golden = (ROOT / "tests/golden/ed25519.bundle.json").read_bytes()
    write("bundle", "golden-bundle", b"\x00" + golden)
    write("bundle", "signed-statement", b"\x01" + jdump(statement()))
    ms = {
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {"publicKey": {"hint": "x"}, "tlogEntries": []},
        "messageSignature": {
            "messageDigest": {"algorithm": "SHA2_256", "digest": base64.b64encode(bytes.fromhex(DIGEST_HEX)).decode()},
            "signature": base64.b64encode(b"\x30\x06\x02\x01\x01\x02\x01\x01").decode(),
        },
    }
    write("bundle", "message-signature", b"\x00" + jdump(ms))
    keyless = json.loads(golden)
    keyless["verificationMaterial"] = {"certificate": {"rawBytes": "MAA="}, "tlogEntries": []}
    keyless["mediaType"] = "application/vnd.dev.sigstore.bundle+json;version=0.3"
    write("bundle", "keyless", b"\x00" + jdump(keyless))


def oci():
    d = "sha256:" + DIGEST_HEX
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": 700,
             "artifactType": "application/vnd.dsse.envelope.v1+json", "annotations": {"a": "b"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "1" * 64, "size": 900,
             "artifactType": "application/vnd.dev.sigstore.bundle.v0.3+json"},
            {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": "sha256:xyz", "size": 1},
        ],
    }
    write("oci", "referrers", b"\x00" + jdump(index))
    layer = lambda mt, extra=None: dict({"mediaType": mt, "digest": d, "size": 10}, **(extra or {}))
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d, "size": 2},
        "layers": [
            layer("application/vnd.dev.cosign.simplesigning.v1+json", {"annotations": {"dev.cosignproject.cosign/signature": "MEUC"}}),
            layer("application/vnd.dsse.envelope.v1+json"),
            layer("application/vnd.dev.sigstore.bundle.v0.3+json"),
            layer("application/octet-stream"),
        ],
        "annotations": {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"},
    }
    write("oci", "manifest", b"\x01" + jdump(manifest))
    write("oci", "manifest-subject", b"\x01" + jdump(dict(manifest, subject={"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": 5}, artifactType="application/vnd.dsse.envelope.v1+json")))


if __name__ == "__main__":
    requests()
    jws()
    control()
    dsse()
    bundle()
    oci()
    for t in sorted(OUT.iterdir()):
        print(f"{t.name}: {len(list(t.iterdir()))} seeds")
