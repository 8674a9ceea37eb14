"""Key agreement (X25519 + HKDF-SHA256) and authenticated encryption of shares (ChaCha20-Poly1305)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tessera.core.errors import ProtocolError

MASK_INFO = b"tessera/secagg/pairwise-mask"
SHARE_INFO = b"tessera/secagg/share-encryption"
KEY_BYTES = 32
_RAW = serialization.Encoding.Raw


def keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes (secret, public)."""
    sk = X25519PrivateKey.generate()
    return (sk.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
            sk.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def public_of(secret: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def valid_public(public: bytes) -> bool:
    """A 32-byte X25519 public key that is not a low-order point (those make every agreed key the same)."""
    if not (isinstance(public, bytes) and len(public) == KEY_BYTES):
        return False
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


def agree(secret: bytes, peer_public: bytes, *, info: bytes) -> bytes:
    """A 32-byte key both sides derive: HKDF-SHA256(X25519(secret, peer_public), info)."""
    return agree_many(secret, {"": peer_public}, info=info)[""]


def agree_many(secret: bytes, peers: Mapping[str, bytes], *, info: bytes) -> dict[str, bytes]:
    """`agree` with each peer's public key, loading the secret key once."""
    sk = X25519PrivateKey.from_private_bytes(secret)
    out: dict[str, bytes] = {}
    for name, pk in peers.items():
        try:
            shared = sk.exchange(X25519PublicKey.from_public_bytes(pk))
        except ValueError as exc:
            raise ProtocolError(f"invalid X25519 public key from a peer ({exc}); the peer must resend its keys") \
                from None
        out[name] = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)
    return out


def seal(key: bytes, plaintext: bytes, *, aad: bytes) -> bytes:
    """nonce || ChaCha20-Poly1305(key, nonce, plaintext, aad)."""
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, *, aad: bytes) -> bytes:
    """Decrypt `seal`'s output; a tampered, misaddressed or wrong-round blob raises ProtocolError."""
    if len(blob) < 12 + 16:
        raise ProtocolError("encrypted share is truncated")
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:12], blob[12:], aad)
    except InvalidTag:
        raise ProtocolError("an encrypted share failed authentication (tampered, misaddressed or for another "
                            "round); the round is abandoned by this client") from None
