"""The symmetric ciphertext blob and the canonical encryption context. No I/O.

    0   1 byte   format version (1)
    1  16 bytes  key UUID
    17  4 bytes  key version, big-endian
    21 12 bytes  IV
    33  ...      AES-GCM ciphertext || 16-byte tag

AAD = header (33 bytes) || canonical(encryption context).
"""

from __future__ import annotations

import functools
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from hsmkeys.errors import InvalidCiphertextException

FORMAT_VERSION = 1
IV_LEN = 12
TAG_LEN = 16
HEADER_LEN = 1 + 16 + 4 + IV_LEN
MIN_BLOB_LEN = HEADER_LEN + TAG_LEN
_HEADER = struct.Struct(">B16sI12s")
#: The one message of every InvalidCiphertextException: it says nothing of what failed.
INVALID_CIPHERTEXT = "The ciphertext is invalid."


@dataclass(frozen=True, slots=True)
class Blob:
    key_uuid: uuid.UUID
    version: int
    iv: bytes
    body: bytes  # ciphertext || tag

    @property
    def header(self) -> bytes:
        return _HEADER.pack(FORMAT_VERSION, self.key_uuid.bytes, self.version, self.iv)

    def pack(self) -> bytes:
        return self.header + self.body


def header(key_uuid: uuid.UUID, version: int, iv: bytes) -> bytes:
    if len(iv) != IV_LEN:
        raise ValueError("IV must be 12 bytes")
    return _HEADER.pack(FORMAT_VERSION, key_uuid.bytes, version, iv)


def unpack(data: bytes) -> Blob:
    """Parse a blob; anything malformed is InvalidCiphertextException."""
    if len(data) < MIN_BLOB_LEN or data[0] != FORMAT_VERSION:
        raise InvalidCiphertextException(INVALID_CIPHERTEXT)
    _, raw_uuid, version, iv = _HEADER.unpack_from(data)
    if version < 1:
        raise InvalidCiphertextException(INVALID_CIPHERTEXT)
    return Blob(_uuid_from_bytes(raw_uuid), version, iv, data[HEADER_LEN:])


@functools.lru_cache(maxsize=8192)  # on every Decrypt's path; a few keys seal most blobs
def _uuid_from_bytes(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes=raw)


def canonical_context(context: Mapping[str, str] | None) -> bytes:
    """Injective encoding: pairs sorted by UTF-8 key bytes, each part length-prefixed."""
    if not context:
        return b""
    parts = []
    for k, v in sorted(((k.encode(), v.encode()) for k, v in context.items())):
        parts.append(struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v)
    return struct.pack(">I", len(parts)) + b"".join(parts)


def aad(blob_header: bytes, context: Mapping[str, str] | None) -> bytes:
    return blob_header + canonical_context(context)
