"""BYOK over the wire: GetParametersForImport / ImportKeyMaterial with boto3, then a
known-answer check that the server encrypts with exactly the imported key."""

from __future__ import annotations

import os
from typing import Any

from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from hsmkeys import ciphertext

KNOWN = bytes.fromhex("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")


def _wrap(public_der: bytes, material: bytes) -> bytes:
    public = serialization.load_der_public_key(public_der)
    assert isinstance(public, rsa.RSAPublicKey)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    ephemeral = os.urandom(32)
    return public.encrypt(ephemeral, oaep) + aes_key_wrap_with_padding(ephemeral, material)


def test_imported_key_encrypts_with_exactly_the_known_material(kms: Any) -> None:
    key = kms.create_key(Origin="EXTERNAL", Description="byok")["KeyMetadata"]
    assert key["KeyState"] == "PendingImport" and key["Origin"] == "EXTERNAL"
    params = kms.get_parameters_for_import(
        KeyId=key["KeyId"], WrappingAlgorithm="RSA_AES_KEY_WRAP_SHA_1", WrappingKeySpec="RSA_3072"
    )
    assert params["KeyId"] == key["Arn"] and params["ParametersValidTo"]
    kms.import_key_material(
        KeyId=key["KeyId"],
        ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=_wrap(params["PublicKey"], KNOWN),
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )
    described = kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]
    assert described["KeyState"] == "Enabled" and described["ExpirationModel"] == "KEY_MATERIAL_DOES_NOT_EXPIRE"
    context = {"test": "known-answer"}
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"imported", EncryptionContext=context)["CiphertextBlob"]
    parsed = ciphertext.unpack(blob)
    aad = parsed.header + ciphertext.canonical_context(context)
    assert AESGCM(KNOWN).decrypt(parsed.iv, parsed.body, aad) == b"imported"
    kms.delete_imported_key_material(KeyId=key["KeyId"])
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "PendingImport"


def test_a_bad_import_token_is_a_kms_error_not_a_500(kms: Any) -> None:
    key = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]
    try:
        kms.import_key_material(KeyId=key["KeyId"], ImportToken=os.urandom(90), EncryptedKeyMaterial=os.urandom(384))
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "InvalidImportTokenException"
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    else:
        raise AssertionError("a random import token was accepted")
