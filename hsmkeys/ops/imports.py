"""Imported key material (BYOK): GetParametersForImport, ImportKeyMaterial,
DeleteImportedKeyMaterial, and the expiry of imported material.

A key created with Origin EXTERNAL starts PendingImport with no HSM object.
GetParametersForImport makes an RSA wrapping pair in the HSM and returns its public
half with an import token; ImportKeyMaterial unwraps the customer's material inside the
HSM (C_UnwrapKey) straight into the key's non-extractable token object. The material
never exists in host memory.

Import token (authenticated, bound to the key, valid 24 hours)::

    b"HKIT" ‖ 1 ‖ key uuid (16) ‖ wrapping pair uuid (16) ‖ algorithm index (1)
    ‖ wrapping spec index (1) ‖ expiry, epoch seconds (8) ‖ HMAC-SHA256 (32)

The HMAC is computed in the HSM with a reserved key of its own (never the audit key).
Re-imported material must be the same: the HSM computes a check value of the new
object (:meth:`hsmkeys.hsm.base.Hsm.key_fingerprint`) and it must equal the one
recorded at the first import.
"""

from __future__ import annotations

import contextlib
import hmac
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from hsmkeys import faultpoints
from hsmkeys.catalog.base import KeyRecord
from hsmkeys.errors import (
    AlreadyExistsException,
    ExpiredImportTokenException,
    IncorrectKeyMaterialException,
    InvalidImportTokenException,
    KMSInvalidStateException,
    NotFoundException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkeys.hsm.base import (
    RESERVED_UUID,
    RSA_AES_ALGORITHMS,
    WRAPPING_ALGORITHMS,
    WRAPPING_KEY_BITS,
)
from hsmkeys.models import (
    DeleteImportedKeyMaterialResult,
    GetParametersForImportResult,
    ImportKeyMaterialResult,
    KeySpec,
    KeyState,
    KeyUsage,
    KeyVersionRef,
    MacAlgorithm,
    Origin,
)
from hsmkeys.ops.common import current_key_material_id
from hsmkeys.validation import check_bytes, check_str

if TYPE_CHECKING:
    from hsmkeys.call import Call
    from hsmkeys.keystore import KeyStore

#: The HSM key that authenticates import tokens (HMAC_256, created on first use).
IMPORT_TOKEN_KEY_REF = KeyVersionRef(RESERVED_UUID, 2)
TOKEN_LIFETIME = timedelta(hours=24)
MAX_VALID_TO = timedelta(days=365)
EXPIRES = "KEY_MATERIAL_EXPIRES"
DOES_NOT_EXPIRE = "KEY_MATERIAL_DOES_NOT_EXPIRE"

_MAGIC = b"HKIT\x01"
_ALGORITHMS = tuple(sorted(WRAPPING_ALGORITHMS))
_SPECS = tuple(sorted(WRAPPING_KEY_BITS))
_BODY = len(_MAGIC) + 16 + 16 + 1 + 1 + 8
_TOKEN = _BODY + 32


def check_enum_text(field: str, value: object, allowed: tuple[str, ...]) -> str:
    text = check_str(field, value, min_len=1, max_len=64)
    if text not in allowed:
        raise ValidationException(
            f"1 validation error detected: Value '{text}' at '{field}' failed to satisfy constraint: "
            f"Member must satisfy enum value set: [{', '.join(allowed)}]"
        )
    return text


def _token_mac(ks: KeyStore, body: bytes) -> bytes:
    try:
        return ks._hsm.mac(IMPORT_TOKEN_KEY_REF, MacAlgorithm.HMAC_SHA_256, body)
    except NotFoundException:
        with contextlib.suppress(AlreadyExistsException):  # another process made it first
            ks._hsm.create_key(IMPORT_TOKEN_KEY_REF, KeySpec.HMAC_256, KeyUsage.GENERATE_VERIFY_MAC)
        return ks._hsm.mac(IMPORT_TOKEN_KEY_REF, MacAlgorithm.HMAC_SHA_256, body)


def _external(ks: KeyStore, key: KeyRecord, operation: str) -> None:
    if key.origin is not Origin.EXTERNAL:
        raise UnsupportedOperationException(
            f"{ks._arn(key.key_uuid)} has origin {key.origin}; {operation} needs a key with origin EXTERNAL."
        )
    if key.state is KeyState.PENDING_DELETION:
        raise KMSInvalidStateException(f"{ks._arn(key.key_uuid)} is pending deletion.")


def get_parameters_for_import(
    ks: KeyStore, call: Call, *, key_id: str, wrapping_algorithm: str, wrapping_key_spec: str
) -> GetParametersForImportResult:
    algorithm = check_enum_text("wrappingAlgorithm", wrapping_algorithm, _ALGORITHMS)
    spec = check_enum_text("wrappingKeySpec", wrapping_key_spec, _SPECS)
    key = ks._key(call, key_id, alias_ok=False)
    _external(ks, key, "GetParametersForImport")
    private_key = key.spec is not KeySpec.SYMMETRIC_DEFAULT and not key.spec.startswith("HMAC")
    if private_key and algorithm not in RSA_AES_ALGORITHMS:
        raise ValidationException(
            f"{key.spec} private keys are imported with RSA_AES_KEY_WRAP_SHA_1 or RSA_AES_KEY_WRAP_SHA_256."
        )
    if algorithm not in ks._hsm.wrapping_algorithms():
        raise UnsupportedOperationException(f"This HSM cannot unwrap {algorithm}; use one of "
                                            f"{', '.join(sorted(ks._hsm.wrapping_algorithms()))}.")
    wrapping = KeyVersionRef(uuid.uuid4(), 1)
    public = ks._hsm.create_wrapping_key(wrapping, spec)
    valid_to = ks._now() + TOKEN_LIFETIME
    body = (
        _MAGIC
        + key.key_uuid.bytes
        + wrapping.key_uuid.bytes
        + bytes([_ALGORITHMS.index(algorithm), _SPECS.index(spec)])
        + int(valid_to.timestamp()).to_bytes(8, "big")
    )
    call.used(ks._arn(key.key_uuid), None)
    return GetParametersForImportResult(ks._arn(key.key_uuid), body + _token_mac(ks, body), public, valid_to)


def _open_token(ks: KeyStore, key: KeyRecord, token: bytes) -> tuple[KeyVersionRef, str]:
    """(wrapping pair, algorithm) of a genuine, unexpired token for ``key``."""
    if len(token) != _TOKEN or not token.startswith(_MAGIC):
        raise InvalidImportTokenException("The import token is not valid.")
    body, tag = token[:_BODY], token[_BODY:]
    if not hmac.compare_digest(_token_mac(ks, body), tag):
        raise InvalidImportTokenException("The import token is not valid.")
    at = len(_MAGIC)
    if uuid.UUID(bytes=body[at : at + 16]) != key.key_uuid:
        raise InvalidImportTokenException("The import token was issued for another KMS key.")
    wrapping = KeyVersionRef(uuid.UUID(bytes=body[at + 16 : at + 32]), 1)
    algorithm = _ALGORITHMS[body[at + 32]]
    expires = datetime.fromtimestamp(int.from_bytes(body[at + 34 : at + 42], "big"), tz=UTC)
    if ks._now() >= expires:
        raise ExpiredImportTokenException("The import token has expired; call GetParametersForImport again.")
    return wrapping, algorithm


def _expiry(ks: KeyStore, valid_to: datetime | None, expiration_model: str | None) -> tuple[str, datetime | None]:
    model = check_enum_text("expirationModel", expiration_model, (EXPIRES, DOES_NOT_EXPIRE)) if (
        expiration_model is not None
    ) else (EXPIRES if valid_to is not None else DOES_NOT_EXPIRE)
    if model == EXPIRES:
        if valid_to is None:
            raise ValidationException("ValidTo is required when ExpirationModel is KEY_MATERIAL_EXPIRES.")
        if valid_to.tzinfo is None:
            valid_to = valid_to.replace(tzinfo=UTC)
        now = ks._now()
        if valid_to <= now or valid_to > now + MAX_VALID_TO:
            raise ValidationException("ValidTo must be in the future and at most 365 days away.")
        return model, valid_to
    if valid_to is not None:
        raise ValidationException("ValidTo is only allowed when ExpirationModel is KEY_MATERIAL_EXPIRES.")
    return model, None


def import_key_material(
    ks: KeyStore,
    call: Call,
    *,
    key_id: str,
    import_token: bytes,
    encrypted_key_material: bytes,
    valid_to: datetime | None = None,
    expiration_model: str | None = None,
) -> ImportKeyMaterialResult:
    token = check_bytes("importToken", import_token, min_len=1, max_len=32768)
    wrapped = check_bytes("encryptedKeyMaterial", encrypted_key_material, min_len=1, max_len=32768)
    key = ks._key(call, key_id, alias_ok=False)
    _external(ks, key, "ImportKeyMaterial")
    wrapping, algorithm = _open_token(ks, key, token)
    model, expires = _expiry(ks, valid_to, expiration_model)
    ref = KeyVersionRef(key.key_uuid, key.current_version)
    has_material = key.state is not KeyState.PENDING_IMPORT
    # Re-importing over live material goes to a scratch object: only its check value is kept.
    target = KeyVersionRef(uuid.uuid4(), 1) if has_material else ref
    try:
        ks._hsm.import_key(target, key.spec, key.usage, wrapping, algorithm, wrapped)
    except AlreadyExistsException:  # a leftover object of a crashed import: replace it
        ks._hsm.destroy_key(target)
        ks._hsm.import_key(target, key.spec, key.usage, wrapping, algorithm, wrapped)
    try:
        fingerprint = ks._hsm.key_fingerprint(target).hex()
        if key.material_fingerprint is not None and not hmac.compare_digest(fingerprint, key.material_fingerprint):
            raise IncorrectKeyMaterialException(
                "The key material is not the material previously imported into this KMS key."
            )
    except Exception:
        ks._hsm.destroy_key(target)  # the object just made, never older material
        raise
    if has_material:
        ks._hsm.destroy_key(target)  # the scratch copy served only the comparison
    faultpoints.reached("import.hsm_done")
    with ks._catalog.transaction():
        fresh = ks._catalog.get_key(key.key_uuid)
        if fresh is None or fresh.state is KeyState.PURGING:
            raise NotFoundException(f"Key '{ks._arn(key.key_uuid)}' does not exist")
        state = KeyState.ENABLED if fresh.state is KeyState.PENDING_IMPORT else fresh.state
        ks._catalog.update_key(
            replace(fresh, state=state, valid_to=expires, expiration_model=model, material_fingerprint=fingerprint)
        )
    faultpoints.reached("import.committed")
    ks._hsm.destroy_wrapping_key(wrapping)  # one import per set of parameters
    call.used(ks._arn(key.key_uuid), key.current_version)
    return ImportKeyMaterialResult(ks._arn(key.key_uuid), current_key_material_id(key))


def delete_imported_key_material(ks: KeyStore, call: Call, *, key_id: str) -> DeleteImportedKeyMaterialResult:
    key = ks._key(call, key_id, alias_ok=False)
    _external(ks, key, "DeleteImportedKeyMaterial")
    had_material = remove_material(ks, key)
    call.used(ks._arn(key.key_uuid), None)
    return DeleteImportedKeyMaterialResult(
        ks._arn(key.key_uuid), current_key_material_id(key) if had_material else None
    )


def remove_material(ks: KeyStore, key: KeyRecord) -> bool:
    """Destroy the key's material and make it PendingImport (rows first: a crash leaves an
    orphan object for doctor, never a usable key without material). Whether the key had
    material (was not PendingImport already)."""
    with ks._catalog.transaction():
        fresh = ks._catalog.get_key(key.key_uuid)
        if fresh is None or fresh.state in (KeyState.PURGING, KeyState.PENDING_DELETION):
            return False
        ks._catalog.update_key(replace(fresh, state=KeyState.PENDING_IMPORT, valid_to=None, expiration_model=None))
    for version in ks._catalog.list_versions(key.key_uuid):
        ks._hsm.destroy_key(version.ref)
    return fresh.state is not KeyState.PENDING_IMPORT


def expire_material(ks: KeyStore) -> list[str]:
    """Maintenance: imported material past its ValidTo is deleted (key → PendingImport)."""
    expired = []
    for key in ks._catalog.keys_material_expired(ks._now()):
        remove_material(ks, key)
        expired.append(str(key.key_uuid))
    return expired
