"""Values KMS documents that hsmkeys does not serve: UnsupportedOperationException, not
the enum ValidationException a value KMS does not know gets."""

from __future__ import annotations

import enum
from typing import Any

import botocore.session
import pytest

from hsmkeys.errors import KMSError
from hsmkeys.keystore import KeyStore
from hsmkeys.kmsclient import LocalKms
from hsmkeys.models import (
    NOT_SERVED,
    DataKeyPairSpec,
    EncryptionAlgorithm,
    KeySpec,
    KeyUsage,
    MessageType,
    Origin,
    SigningAlgorithm,
)

# hsmkeys' enum -> the botocore model's shape of the same values
MODEL_SHAPES: dict[type[enum.Enum], str] = {
    KeySpec: "KeySpec",
    KeyUsage: "KeyUsageType",
    Origin: "OriginType",
    EncryptionAlgorithm: "EncryptionAlgorithmSpec",
    SigningAlgorithm: "SigningAlgorithmSpec",
    MessageType: "MessageType",
    DataKeyPairSpec: "DataKeyPairSpec",
}


def test_the_not_served_table_is_what_the_model_documents_beyond_the_enums() -> None:
    model = botocore.session.get_session().get_service_model("kms")
    assert set(NOT_SERVED) == set(MODEL_SHAPES)
    for ours, shape in MODEL_SHAPES.items():
        documented = set(model.shape_for(shape).enum)
        served = {member.value for member in ours}
        assert served <= documented, ours
        assert NOT_SERVED[ours] == documented - served, ours


def _error(kms: LocalKms, operation: str, params: dict[str, Any]) -> str:
    with pytest.raises(KMSError) as caught:
        kms.call(operation, params)
    return caught.value.code


@pytest.mark.parametrize(
    "operation, params",
    [
        ("CreateKey", {"KeySpec": "ML_DSA_44", "KeyUsage": "SIGN_VERIFY"}),
        ("CreateKey", {"KeySpec": "ECC_NIST_EDWARDS25519", "KeyUsage": "SIGN_VERIFY"}),
        ("CreateKey", {"KeySpec": "RSA_2048", "KeyUsage": "ENCAPSULATE_DECAPSULATE"}),
        ("CreateKey", {"Origin": "AWS_CLOUDHSM"}),
        ("GenerateDataKeyPair", {"KeyId": "SYMMETRIC", "KeyPairSpec": "SM2"}),
        ("Sign", {"KeyId": "SIGNING", "Message": b"x", "MessageType": "EXTERNAL_MU", "SigningAlgorithm": "ECDSA_SHA_256"}),
    ],
)
def test_a_documented_value_hsmkeys_does_not_serve_is_unsupported(
    store: KeyStore, operation: str, params: dict[str, Any]
) -> None:
    kms = LocalKms(store)
    keys = {
        "SYMMETRIC": kms.call("CreateKey", {})["KeyMetadata"]["KeyId"],
        "SIGNING": kms.call("CreateKey", {"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY"})["KeyMetadata"]["KeyId"],
    }
    sent = {name: keys.get(value, value) if name == "KeyId" else value for name, value in params.items()}
    assert _error(kms, operation, sent) == "UnsupportedOperationException"
    # A value no KMS has is still the enum ValidationException.
    bogus = {name: "NOT_A_VALUE" if name in ("KeySpec", "KeyUsage", "Origin", "KeyPairSpec",
                                              "EncryptionAlgorithm", "MessageType") else value
             for name, value in sent.items()}  # fmt: skip
    assert _error(kms, operation, bogus) == "ValidationException"


@pytest.mark.parametrize(
    "spec, usage, operation, params",
    [
        ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", "Encrypt", {"Plaintext": b"x", "EncryptionAlgorithm": "SM2PKE"}),
        ("RSA_2048", "ENCRYPT_DECRYPT", "Encrypt", {"Plaintext": b"x", "EncryptionAlgorithm": "SM2PKE"}),
        ("ECC_NIST_P256", "SIGN_VERIFY", "Sign", {"Message": b"x", "SigningAlgorithm": "SM2DSA"}),
        ("ECC_NIST_P256", "SIGN_VERIFY", "Sign", {"Message": b"x", "SigningAlgorithm": "ED25519_SHA_512"}),
    ],
)
def test_a_documented_algorithm_for_another_key_spec_is_invalid_key_usage(
    store: KeyStore, spec: str, usage: str, operation: str, params: dict[str, Any]
) -> None:
    kms = LocalKms(store)
    key = kms.call("CreateKey", {"KeySpec": spec, "KeyUsage": usage})["KeyMetadata"]["KeyId"]
    assert _error(kms, operation, {"KeyId": key, **params}) == "InvalidKeyUsageException"
