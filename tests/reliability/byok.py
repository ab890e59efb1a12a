"""BYOK from the client's side, for the reliability tests: import 32 random bytes."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from hsmkeys.keystore import KeyStore


def import_symmetric(store: KeyStore, key_id: str | None = None) -> str:
    """A key with origin EXTERNAL holding fresh imported material; its id."""
    if key_id is None:
        key_id = store.create_key(origin="EXTERNAL").key_metadata.key_id
    params = store.get_parameters_for_import(
        key_id=key_id, wrapping_algorithm="RSAES_OAEP_SHA_1", wrapping_key_spec="RSA_2048"
    )
    public = serialization.load_der_public_key(params.public_key)
    assert isinstance(public, rsa.RSAPublicKey)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    store.import_key_material(
        key_id=key_id,
        import_token=params.import_token,
        encrypted_key_material=public.encrypt(os.urandom(32), oaep),
        expiration_model="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )
    return key_id
