"""Imported key material (origin EXTERNAL): checked at load, wrapped locally, imported on apply."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from hsmkeys.kmsclient import LocalKms
from hsmkeys.provision.keymaterial import load_key_material, wrap_key_material
from hsmkeys.provision.schema import ProvisionError, load_file

from .conftest import RunProvision

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@pytest.fixture(scope="module")
def wrapping_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _spki(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_symmetric_material_is_wrapped_with_rsa_oaep_sha256(tmp_path: Path, wrapping_key: rsa.RSAPrivateKey) -> None:
    secret = os.urandom(32)
    (tmp_path / "k").write_bytes(secret)
    material = load_key_material(tmp_path / "k", "SYMMETRIC_DEFAULT")
    assert material.wrapping_algorithms[0] == "RSAES_OAEP_SHA_256"
    wrapped = wrap_key_material(material, _spki(wrapping_key), "RSAES_OAEP_SHA_256")
    assert wrapping_key.decrypt(wrapped, OAEP) == secret
    assert secret.hex() not in repr(material)


def test_private_key_is_wrapped_with_rsa_aes_key_wrap(tmp_path: Path, wrapping_key: rsa.RSAPrivateKey) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "k.pem").write_bytes(pem)
    material = load_key_material(tmp_path / "k.pem", "ECC_NIST_P256")
    assert material.wrapping_algorithms == ("RSA_AES_KEY_WRAP_SHA_256", "RSA_AES_KEY_WRAP_SHA_1")
    wrapped = wrap_key_material(material, _spki(wrapping_key), "RSA_AES_KEY_WRAP_SHA_256")
    aes_key = wrapping_key.decrypt(wrapped[:256], OAEP)
    der = aes_key_unwrap_with_padding(aes_key, wrapped[256:])
    assert der == private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("spec", "content", "message"),
    [
        ("SYMMETRIC_DEFAULT", b"short", "SYMMETRIC_DEFAULT key material must be 32 raw bytes, the file has 5"),
        ("HMAC_512", b"x" * 32, "HMAC_512 key material must be 64-128 raw bytes"),
        ("RSA_2048", b"not a key", "not an unencrypted PKCS#8 private key"),
        ("ECC_NIST_P384", "p256", "ECC_NIST_P384 needs an EC private key on secp384r1"),
    ],
)
def test_unusable_key_material_is_a_located_problem(
    write_file: Callable[[str, str], Path], tmp_path: Path, spec: str, content: bytes | str, message: str
) -> None:
    if content == "p256":
        content = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    assert isinstance(content, bytes)
    (tmp_path / "material.bin").write_bytes(content)
    usage = "\n    key_usage: SIGN_VERIFY" if spec.startswith("RSA") else ""
    path = write_file(
        "keys.yaml",
        f"keys:\n  - alias: alias/imported\n    origin: EXTERNAL\n    key_spec: {spec}{usage}\n"
        "    key_material_file: material.bin\n",
    )
    with pytest.raises(ProvisionError) as info:
        load_file(path)
    (problem,) = info.value.problems
    line = 6 if usage else 5
    assert f"keys.yaml:{line}: alias/imported: key_material_file: " in problem and message in problem


def test_plan_for_an_imported_key_creates_it_then_imports(
    provision: RunProvision, tmp_path: Path, kms: LocalKms
) -> None:
    (tmp_path / "partner.key").write_bytes(os.urandom(32))
    text = "keys:\n  - alias: alias/partner-import\n    origin: EXTERNAL\n    key_material_file: partner.key\n"
    ran = provision("plan", text)
    assert ran.code == 2
    assert ran.out.splitlines()[:2] == [
        "+ create alias/partner-import (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT, origin EXTERNAL)",
        "+ import key material alias/partner-import",
    ]


def test_apply_imports_the_material_and_a_rerun_changes_nothing(
    provision: RunProvision, tmp_path: Path, kms: LocalKms
) -> None:
    secret = os.urandom(32)
    (tmp_path / "partner.key").write_bytes(secret)
    text = "keys:\n  - alias: alias/partner-import\n    origin: EXTERNAL\n    key_material_file: partner.key\n"
    ran = provision("apply", text, "--yes")
    assert ran.code == 0, ran.err
    md = kms.call("DescribeKey", {"KeyId": "alias/partner-import"})["KeyMetadata"]
    assert (md["Origin"], md["KeyState"]) == ("EXTERNAL", "Enabled")
    blob = kms.call("Encrypt", {"KeyId": md["KeyId"], "Plaintext": b"partner"})["CiphertextBlob"]
    assert kms.call("Decrypt", {"CiphertextBlob": blob})["Plaintext"] == b"partner"
    assert provision("plan", text).out == "no changes\n"
    assert secret.hex() not in ran.out + ran.err
