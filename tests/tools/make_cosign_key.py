#!/usr/bin/env python3
"""Writes a cosign-format key pair without cosign or any of our code, for the interop tests.

usage: make_cosign_key.py OUT_DIR NAME PASSWORD [--algorithm ecdsa-p256|ed25519]
                          [--label sigstore|cosign]

Writes OUT_DIR/NAME.key and OUT_DIR/NAME.pub as `cosign generate-key-pair` does
(cosign pkg/cosign/keys.go with go-securesystemslib's `encrypted` package):
  - the private key as PKCS#8 DER (here: Python `cryptography`),
  - sealed with NaCl secretbox (here: PyNaCl, i.e. libsodium) under the key
    scrypt(password, salt, N=32768, r=8, p=1, 32 bytes) (here: hashlib, i.e. OpenSSL),
  - as compact JSON {"kdf":{"name":"scrypt","params":{"N","r","p"},"salt"},
    "cipher":{"name":"nacl/secretbox","nonce"},"ciphertext"} (base64 fields),
  - in a PEM block "ENCRYPTED SIGSTORE PRIVATE KEY" (--label cosign: the older
    "ENCRYPTED COSIGN PRIVATE KEY");
and the public key as PEM SubjectPublicKeyInfo ("PUBLIC KEY").
Prints the keyid (hex SHA-256 of the SubjectPublicKeyInfo DER).
"""
import argparse
import base64
import hashlib
import json
import os
import sys

import nacl.secret
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

LABELS = {"sigstore": "ENCRYPTED SIGSTORE PRIVATE KEY", "cosign": "ENCRYPTED COSIGN PRIVATE KEY"}
N, R, P = 32768, 8, 1


def b64(data):
    return base64.b64encode(data).decode()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("name")
    ap.add_argument("password")
    ap.add_argument("--algorithm", choices=["ecdsa-p256", "ed25519"], default="ecdsa-p256")
    ap.add_argument("--label", choices=sorted(LABELS), default="sigstore")
    args = ap.parse_args()

    if args.algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    salt = os.urandom(32)
    box_key = hashlib.scrypt(
        args.password.encode(), salt=salt, n=N, r=R, p=P, maxmem=64 * 1024 * 1024, dklen=32
    )
    nonce = os.urandom(nacl.secret.SecretBox.NONCE_SIZE)
    sealed = nacl.secret.SecretBox(box_key).encrypt(der, nonce).ciphertext
    body = json.dumps(
        {
            "kdf": {"name": "scrypt", "params": {"N": N, "r": R, "p": P}, "salt": b64(salt)},
            "cipher": {"name": "nacl/secretbox", "nonce": b64(nonce)},
            "ciphertext": b64(sealed),
        },
        separators=(",", ":"),
    ).encode()
    label = LABELS[args.label]
    text = b64(body)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    pem = "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)

    os.makedirs(args.out_dir, exist_ok=True)
    private_path = os.path.join(args.out_dir, args.name + ".key")
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pem)
    public = key.public_key()
    with open(os.path.join(args.out_dir, args.name + ".pub"), "wb") as f:
        f.write(
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    print(hashlib.sha256(spki).hexdigest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
