"""Throwaway DKIM/ARC signing keys for the tests."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def rsa_dkim_key(bits: int = 2048) -> tuple[bytes, str]:
    """A fresh RSA key: (PKCS#1 PEM private key, as dkimpy signs with it; the key record
    ``v=DKIM1; k=rsa; p=…`` to publish at ``<selector>._domainkey.<domain>``)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
