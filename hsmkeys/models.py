"""Values that cross layers: enums for closed sets and frozen dataclasses for results.

Result classes mirror the AWS KMS response shapes field for field (snake_case of
the botocore member names), so the server can serialise them without per-operation
code. Extra fields (for example ``KeyMetadata.current_version``) are hsmkeys' own
and are not sent on the wire.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime


class KeySpec(enum.StrEnum):
    SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"
    ECC_NIST_P256 = "ECC_NIST_P256"
    ECC_NIST_P384 = "ECC_NIST_P384"
    ECC_NIST_P521 = "ECC_NIST_P521"
    ECC_SECG_P256K1 = "ECC_SECG_P256K1"
    HMAC_224 = "HMAC_224"
    HMAC_256 = "HMAC_256"
    HMAC_384 = "HMAC_384"
    HMAC_512 = "HMAC_512"


class KeyUsage(enum.StrEnum):
    ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"
    SIGN_VERIFY = "SIGN_VERIFY"
    GENERATE_VERIFY_MAC = "GENERATE_VERIFY_MAC"
    KEY_AGREEMENT = "KEY_AGREEMENT"


class KeyState(enum.StrEnum):
    ENABLED = "Enabled"
    DISABLED = "Disabled"
    PENDING_DELETION = "PendingDeletion"
    PENDING_IMPORT = "PendingImport"
    # hsmkeys' own: a purge has started (HSM objects may be partly destroyed).
    PURGING = "Purging"


class Origin(enum.StrEnum):
    AWS_KMS = "AWS_KMS"
    EXTERNAL = "EXTERNAL"


class EncryptionAlgorithm(enum.StrEnum):
    SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
    RSAES_OAEP_SHA_1 = "RSAES_OAEP_SHA_1"
    RSAES_OAEP_SHA_256 = "RSAES_OAEP_SHA_256"


class SigningAlgorithm(enum.StrEnum):
    RSASSA_PSS_SHA_256 = "RSASSA_PSS_SHA_256"
    RSASSA_PSS_SHA_384 = "RSASSA_PSS_SHA_384"
    RSASSA_PSS_SHA_512 = "RSASSA_PSS_SHA_512"
    RSASSA_PKCS1_V1_5_SHA_256 = "RSASSA_PKCS1_V1_5_SHA_256"
    RSASSA_PKCS1_V1_5_SHA_384 = "RSASSA_PKCS1_V1_5_SHA_384"
    RSASSA_PKCS1_V1_5_SHA_512 = "RSASSA_PKCS1_V1_5_SHA_512"
    ECDSA_SHA_256 = "ECDSA_SHA_256"
    ECDSA_SHA_384 = "ECDSA_SHA_384"
    ECDSA_SHA_512 = "ECDSA_SHA_512"


class MacAlgorithm(enum.StrEnum):
    HMAC_SHA_224 = "HMAC_SHA_224"
    HMAC_SHA_256 = "HMAC_SHA_256"
    HMAC_SHA_384 = "HMAC_SHA_384"
    HMAC_SHA_512 = "HMAC_SHA_512"


class KeyAgreementAlgorithm(enum.StrEnum):
    ECDH = "ECDH"


class MessageType(enum.StrEnum):
    RAW = "RAW"
    DIGEST = "DIGEST"


class DataKeySpec(enum.StrEnum):
    AES_128 = "AES_128"
    AES_256 = "AES_256"


class DataKeyPairSpec(enum.StrEnum):
    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"
    ECC_NIST_P256 = "ECC_NIST_P256"
    ECC_NIST_P384 = "ECC_NIST_P384"
    ECC_NIST_P521 = "ECC_NIST_P521"
    ECC_SECG_P256K1 = "ECC_SECG_P256K1"


class RotationType(enum.StrEnum):
    AUTOMATIC = "AUTOMATIC"
    ON_DEMAND = "ON_DEMAND"


class IncludeKeyMaterial(enum.StrEnum):
    """ListKeyRotations: which materials to list (ROTATIONS_ONLY is the default)."""

    ALL_KEY_MATERIAL = "ALL_KEY_MATERIAL"
    ROTATIONS_ONLY = "ROTATIONS_ONLY"


class DryRunModifier(enum.StrEnum):
    """Decrypt/ReEncrypt DryRunModifiers: IGNORE_CIPHERTEXT checks authorization only."""

    IGNORE_CIPHERTEXT = "IGNORE_CIPHERTEXT"


class KeyMaterialState(enum.StrEnum):
    """What a key version is used for: CURRENT encrypts and decrypts, NON_CURRENT only
    decrypts (hsmkeys has no pending-rotation or multi-Region states)."""

    CURRENT = "CURRENT"
    NON_CURRENT = "NON_CURRENT"


#: Request values the KMS API documents that hsmkeys does not serve, per enum. Naming one
#: is UnsupportedOperationException (hsmkeys.validation.check_enum), not the enum
#: ValidationException an undocumented value gets. tests/unit/test_not_served_values.py keeps
#: this equal to botocore's model minus the enums' members.
NOT_SERVED: dict[type[enum.Enum], frozenset[str]] = {
    KeySpec: frozenset(
        {"ECC_NIST_EDWARDS25519", "ML_DSA_44", "ML_DSA_65", "ML_DSA_87", "ML_KEM_512", "ML_KEM_768", "ML_KEM_1024", "SM2"}
    ),
    KeyUsage: frozenset({"ENCAPSULATE_DECAPSULATE"}),
    Origin: frozenset({"AWS_CLOUDHSM", "EXTERNAL_KEY_STORE"}),  # custom key stores
    EncryptionAlgorithm: frozenset({"SM2PKE"}),
    SigningAlgorithm: frozenset({"ED25519_SHA_512", "ED25519_PH_SHA_512", "ML_DSA_SHAKE_256", "SM2DSA"}),
    MessageType: frozenset({"EXTERNAL_MU"}),
    DataKeyPairSpec: frozenset({"ECC_NIST_EDWARDS25519", "ML_KEM_512", "ML_KEM_768", "ML_KEM_1024", "SM2"}),
}


@dataclass(frozen=True, slots=True)
class KeyVersionRef:
    """Names one key version's object(s) in the HSM."""

    key_uuid: uuid.UUID
    version: int

    # The generated ones go through uuid.UUID's Python __hash__/__eq__; refs are dict
    # keys on every call's path (handle cache, GCM budget). Same equality, cheaper.
    def __hash__(self) -> int:
        return hash((self.key_uuid.int, self.version))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KeyVersionRef):
            return self.version == other.version and self.key_uuid.int == other.key_uuid.int
        return NotImplemented

    @property
    def label(self) -> str:
        return f"hsmkeys/{self.key_uuid}/v{self.version}"

    @property
    def object_id(self) -> bytes:
        """CKA_ID: 16-byte UUID followed by the 4-byte big-endian version."""
        return self.key_uuid.bytes + self.version.to_bytes(4, "big")


# ---------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Tag:
    tag_key: str
    tag_value: str


@dataclass(frozen=True, slots=True)
class KeyMetadata:
    aws_account_id: str
    key_id: str
    arn: str
    creation_date: datetime
    enabled: bool
    description: str
    key_usage: KeyUsage
    key_state: KeyState
    origin: Origin
    key_manager: str
    customer_master_key_spec: KeySpec
    key_spec: KeySpec
    multi_region: bool = False
    deletion_date: datetime | None = None
    pending_deletion_window_in_days: int | None = None
    encryption_algorithms: tuple[EncryptionAlgorithm, ...] = ()
    signing_algorithms: tuple[SigningAlgorithm, ...] = ()
    mac_algorithms: tuple[MacAlgorithm, ...] = ()
    key_agreement_algorithms: tuple[KeyAgreementAlgorithm, ...] = ()
    valid_to: datetime | None = None  # imported material's expiry
    expiration_model: str | None = None  # EXTERNAL keys: KEY_MATERIAL_EXPIRES / _DOES_NOT_EXPIRE
    # Symmetric encryption keys with key material: its id (as ListKeyRotations shows it).
    current_key_material_id: str | None = None
    current_version: int = 1  # hsmkeys' own; not on the wire


@dataclass(frozen=True, slots=True)
class KeyListEntry:
    key_id: str
    key_arn: str


@dataclass(frozen=True, slots=True)
class AliasListEntry:
    alias_name: str
    alias_arn: str
    target_key_id: str | None = None
    creation_date: datetime | None = None
    last_updated_date: datetime | None = None


@dataclass(frozen=True, slots=True)
class RotationsListEntry:
    """One key material of ListKeyRotations. The first material (listed with
    IncludeKeyMaterial=ALL_KEY_MATERIAL) has no rotation date or type."""

    key_id: str
    rotation_date: datetime | None = None
    rotation_type: RotationType | None = None
    key_material_id: str | None = None
    key_material_state: KeyMaterialState | None = None


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class CreateKeyResult:
    key_metadata: KeyMetadata


@dataclass(frozen=True, slots=True)
class DescribeKeyResult:
    key_metadata: KeyMetadata


@dataclass(frozen=True, slots=True)
class ListKeysResult:
    keys: tuple[KeyListEntry, ...]
    truncated: bool
    next_marker: str | None = None


@dataclass(frozen=True, slots=True)
class ListAliasesResult:
    aliases: tuple[AliasListEntry, ...]
    truncated: bool
    next_marker: str | None = None


@dataclass(frozen=True, slots=True)
class ListResourceTagsResult:
    tags: tuple[Tag, ...]
    truncated: bool
    next_marker: str | None = None


@dataclass(frozen=True, slots=True)
class EncryptResult:
    ciphertext_blob: bytes
    key_id: str  # key ARN
    encryption_algorithm: EncryptionAlgorithm


@dataclass(frozen=True, slots=True)
class DecryptResult:
    key_id: str  # key ARN
    plaintext: bytes = field(repr=False)
    encryption_algorithm: EncryptionAlgorithm
    key_version: int = 1  # hsmkeys' own; not on the wire
    key_material_id: str | None = None  # symmetric keys only (None for RSA)


@dataclass(frozen=True, slots=True)
class ReEncryptResult:
    ciphertext_blob: bytes
    source_key_id: str
    key_id: str
    source_encryption_algorithm: EncryptionAlgorithm
    destination_encryption_algorithm: EncryptionAlgorithm
    source_key_material_id: str | None = None  # a symmetric source only
    destination_key_material_id: str | None = None  # a symmetric destination only


@dataclass(frozen=True, slots=True)
class GenerateDataKeyResult:
    ciphertext_blob: bytes
    plaintext: bytes = field(repr=False)
    key_id: str
    key_material_id: str


@dataclass(frozen=True, slots=True)
class GenerateDataKeyWithoutPlaintextResult:
    ciphertext_blob: bytes
    key_id: str
    key_material_id: str


@dataclass(frozen=True, slots=True)
class GenerateRandomResult:
    plaintext: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class GetKeyRotationStatusResult:
    key_rotation_enabled: bool
    key_id: str
    rotation_period_in_days: int | None = None
    next_rotation_date: datetime | None = None
    on_demand_rotation_start_date: datetime | None = None


@dataclass(frozen=True, slots=True)
class RotateKeyOnDemandResult:
    key_id: str


@dataclass(frozen=True, slots=True)
class ListKeyRotationsResult:
    rotations: tuple[RotationsListEntry, ...]
    truncated: bool
    next_marker: str | None = None


@dataclass(frozen=True, slots=True)
class ScheduleKeyDeletionResult:
    key_id: str
    deletion_date: datetime
    key_state: KeyState
    pending_window_in_days: int


@dataclass(frozen=True, slots=True)
class CancelKeyDeletionResult:
    key_id: str


@dataclass(frozen=True, slots=True)
class MaintenanceReport:
    rotated: tuple[str, ...]  # key ids rotated automatically
    purged: tuple[str, ...]  # key ids purged
    swept: tuple[str, ...] = ()  # labels of orphan HSM objects destroyed (crashed creates)


# ------------------------------------------------ asymmetric and HMAC results


@dataclass(frozen=True, slots=True)
class SignResult:
    key_id: str
    signature: bytes
    signing_algorithm: SigningAlgorithm


@dataclass(frozen=True, slots=True)
class VerifyResult:
    key_id: str
    signature_valid: bool
    signing_algorithm: SigningAlgorithm


@dataclass(frozen=True, slots=True)
class GetPublicKeyResult:
    key_id: str
    public_key: bytes  # DER SubjectPublicKeyInfo
    customer_master_key_spec: KeySpec
    key_spec: KeySpec
    key_usage: KeyUsage
    encryption_algorithms: tuple[EncryptionAlgorithm, ...] = ()
    signing_algorithms: tuple[SigningAlgorithm, ...] = ()
    key_agreement_algorithms: tuple[KeyAgreementAlgorithm, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerateMacResult:
    mac: bytes
    mac_algorithm: MacAlgorithm
    key_id: str


@dataclass(frozen=True, slots=True)
class VerifyMacResult:
    key_id: str
    mac_valid: bool
    mac_algorithm: MacAlgorithm


@dataclass(frozen=True, slots=True)
class GenerateDataKeyPairResult:
    private_key_ciphertext_blob: bytes
    private_key_plaintext: bytes = field(repr=False)
    public_key: bytes
    key_id: str
    key_pair_spec: DataKeyPairSpec
    key_material_id: str


@dataclass(frozen=True, slots=True)
class GenerateDataKeyPairWithoutPlaintextResult:
    private_key_ciphertext_blob: bytes
    public_key: bytes
    key_id: str
    key_pair_spec: DataKeyPairSpec
    key_material_id: str


@dataclass(frozen=True, slots=True)
class DeriveSharedSecretResult:
    key_id: str
    shared_secret: bytes = field(repr=False)
    key_agreement_algorithm: KeyAgreementAlgorithm
    key_origin: Origin


# ---------------------------------------------------------------- key policies and grants


@dataclass(frozen=True, slots=True)
class GetKeyPolicyResult:
    policy: str
    policy_name: str = "default"


@dataclass(frozen=True, slots=True)
class ListKeyPoliciesResult:
    policy_names: tuple[str, ...]
    truncated: bool
    next_marker: str | None = None


@dataclass(frozen=True, slots=True)
class GrantConstraints:
    """A grant's encryption context constraints (request and response shape)."""

    encryption_context_subset: dict[str, str] | None = None
    encryption_context_equals: dict[str, str] | None = None
    source_arn: str | None = None


@dataclass(frozen=True, slots=True)
class CreateGrantResult:
    grant_token: str
    grant_id: str


@dataclass(frozen=True, slots=True)
class GrantListEntry:
    key_id: str  # key ARN
    grant_id: str
    creation_date: datetime
    grantee_principal: str
    issuing_account: str
    operations: tuple[str, ...]
    name: str | None = None
    retiring_principal: str | None = None
    constraints: GrantConstraints | None = None


@dataclass(frozen=True, slots=True)
class ListGrantsResult:
    grants: tuple[GrantListEntry, ...]
    truncated: bool
    next_marker: str | None = None


# ---------------------------------------------------------------- imported key material


@dataclass(frozen=True, slots=True)
class GetParametersForImportResult:
    key_id: str  # key ARN
    import_token: bytes
    public_key: bytes  # DER SubjectPublicKeyInfo of the wrapping key
    parameters_valid_to: datetime


@dataclass(frozen=True, slots=True)
class ImportKeyMaterialResult:
    key_id: str  # key ARN
    key_material_id: str | None = None  # symmetric encryption keys only


@dataclass(frozen=True, slots=True)
class DeleteImportedKeyMaterialResult:
    key_id: str  # key ARN
    key_material_id: str | None = None  # symmetric encryption keys that had material only


# ------------------------------------------------ AWS managed keys and key usage


class KeyManager(enum.StrEnum):
    CUSTOMER = "CUSTOMER"
    AWS = "AWS"  # an AWS managed key (alias/aws/<service>): created on first use, not manageable


@dataclass(frozen=True, slots=True)
class KeyLastUsageData:
    """The last successful cryptographic use; all None (an empty object on the wire) for
    a key not used since tracking began."""

    operation: str | None = None  # a KeyLastUsageTrackingOperation: Encrypt, Decrypt, Sign, ...
    timestamp: datetime | None = None
    cloud_trail_event_id: str | None = None  # the audit line's request id
    kms_request_id: str | None = None


@dataclass(frozen=True, slots=True)
class GetKeyLastUsageResult:
    key_id: str  # key ARN
    tracking_start_date: datetime  # tracking's start or the key's creation, whichever is later
    key_creation_date: datetime
    key_last_usage: KeyLastUsageData = KeyLastUsageData()  # empty: not used since tracking started
