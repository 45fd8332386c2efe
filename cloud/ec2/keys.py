"""AWS key pair fingerprints, computed as EC2 (and Arvados' Go driver) compute them.

EC2 does not use ssh-keygen's fingerprints: an imported RSA key is known by the MD5 (and a
generated one by the SHA-1) of its PKIX DER encoding, colon-separated hex; an ed25519 key by
``SHA256:`` + base64 of the SHA-256 of its SSH wire encoding, with or without ``=`` padding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey


def _hex(digest: bytes) -> str:
    return ":".join(f"{b:02x}" for b in digest)


def aws_fingerprints(public_key: str) -> list[str]:
    """The fingerprints EC2 may report for an ``authorized_keys`` line, the name-giving one first.

    RSA: [MD5, SHA-1] of the PKIX DER; others: [SHA256 padded, SHA256 unpadded]. ValueError if
    the line is not an OpenSSH public key.
    """
    parts = public_key.strip().split()
    if len(parts) < 2:
        raise ValueError("not an OpenSSH public key line (expected 'TYPE BASE64 [comment]')")
    try:
        blob = base64.b64decode(parts[1], validate=True)
        key = serialization.load_ssh_public_key(f"{parts[0]} {parts[1]}".encode())
    except (binascii.Error, ValueError, TypeError) as e:
        raise ValueError(f"cannot parse public key: {e}") from None
    if isinstance(key, RSAPublicKey):
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return [_hex(hashlib.md5(der).digest()), _hex(hashlib.sha1(der).digest())]
    unpadded = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return [unpadded + "=", unpadded]
