"""Limits and small checks shared by the operation implementations."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from hsmkeys.arns import parse_uuid
from hsmkeys.errors import (
    DryRunOperationException,
    InvalidKeyUsageException,
    InvalidMarkerException,
    TagException,
    ValidationException,
)
from hsmkeys.models import NOT_SERVED, EncryptionAlgorithm, KeySpec, KeyUsage, KeyVersionRef, Tag
from hsmkeys.validation import check_enum, check_int, check_str

if TYPE_CHECKING:
    from hsmkeys.call import Call
    from hsmkeys.catalog.base import KeyRecord
    from hsmkeys.keystore import KeyStore

MAX_PLAINTEXT = 4096
MAX_CIPHERTEXT = 6144
MAX_DESCRIPTION = 8192
MAX_POLICY = 32768
MAX_TAGS = 50
MAX_ALIASES_PER_KEY = 50
MAX_ON_DEMAND_ROTATIONS = 25
ROTATION_PERIOD_DAYS = (90, 2560)
DEFAULT_ROTATION_PERIOD_DAYS = 365
DELETION_WINDOW_DAYS = (7, 30)


def dry_run_error(operation: str) -> DryRunOperationException:
    return DryRunOperationException(
        f"The request would have succeeded, but the DryRun option is set ({operation})."
    )


def data_key_master(ks: KeyStore, call: Call, key_id: str, operation: str) -> KeyRecord:
    """The usable SYMMETRIC_DEFAULT ENCRYPT_DECRYPT key that seals data keys (and data key
    pairs), authorized for the call; checked before any key material is generated."""
    key = ks._key(call, key_id)
    ks._require_enabled(key)
    ks._require_usage(key, KeyUsage.ENCRYPT_DECRYPT)
    if key.spec is not KeySpec.SYMMETRIC_DEFAULT:
        raise InvalidKeyUsageException(
            f"{ks._arn(key.key_uuid)} key spec {key.spec} is not valid for {operation}; "
            "a symmetric encryption KMS key is required."
        )
    return key


def require_symmetric_algorithm(algorithm: str | EncryptionAlgorithm | None) -> None:
    """A symmetric key takes SYMMETRIC_DEFAULT; any other algorithm KMS documents (SM2PKE
    too) is InvalidKeyUsageException, an unknown one ValidationException."""
    if algorithm is None:
        return
    if (
        algorithm in NOT_SERVED[EncryptionAlgorithm]
        or check_enum(EncryptionAlgorithm, "encryptionAlgorithm", algorithm) is not EncryptionAlgorithm.SYMMETRIC_DEFAULT
    ):
        raise InvalidKeyUsageException(f"The encryption algorithm {algorithm} is not valid for this key.")


def key_type(spec: KeySpec) -> str:
    if spec is KeySpec.SYMMETRIC_DEFAULT:
        return "symmetric"
    return "hmac" if spec.startswith("HMAC") else "asymmetric"


def page_limit(limit: int | None, *, default: int = 100, high: int = 1000) -> int:
    return check_int("limit", limit, low=1, high=high) if limit is not None else default


def uuid_marker(marker: str | None) -> uuid.UUID | None:
    if marker is None:
        return None
    check_str("marker", marker, min_len=1, max_len=1024)
    value = parse_uuid(marker)
    if value is None:
        raise InvalidMarkerException("The marker is not valid.")
    return value


def tag_map(tags: Iterable[Tag | Mapping[str, str]] | None) -> dict[str, str]:
    """Validate tags (KMS limits) given as Tag objects or {TagKey, TagValue} mappings."""
    if tags is None:
        return {}
    if isinstance(tags, str | bytes | Mapping):
        raise ValidationException("tags must be a list of {TagKey, TagValue}")
    out: dict[str, str] = {}
    for tag in tags:
        raw_key: object
        raw_value: object
        if isinstance(tag, Tag):
            raw_key, raw_value = tag.tag_key, tag.tag_value
        elif isinstance(tag, Mapping):
            raw_key = tag["TagKey"] if "TagKey" in tag else tag.get("tag_key")
            raw_value = tag["TagValue"] if "TagValue" in tag else tag.get("tag_value")
        else:
            raise ValidationException("tags must be a list of {TagKey, TagValue}")
        key = check_str("tagKey", raw_key, min_len=1, max_len=128)
        value = check_str("tagValue", raw_value, min_len=0, max_len=256)
        if key.startswith("aws:"):
            raise TagException("Tag keys beginning with aws: are reserved.")
        out[key] = value
    if len(out) > MAX_TAGS:
        raise TagException(f"A key may have at most {MAX_TAGS} tags.")
    return out


def key_material_id(ref: KeyVersionRef) -> str:
    return hashlib.sha256(ref.object_id).hexdigest()


def current_key_material_id(key: KeyRecord) -> str | None:
    """The id of the key's current version's material; KMS gives key material ids to
    symmetric encryption keys only (None for any other)."""
    if key.spec is not KeySpec.SYMMETRIC_DEFAULT:
        return None
    return key_material_id(KeyVersionRef(key.key_uuid, key.current_version))
