"""hsmkeys.hsm.finder against SoftHSM2: objects it builds behave as python-pkcs11's own,
attribute reads follow python-pkcs11's rules, vanished objects are left out, a full pass
cannot be starved by searches, and a lost session is recovered by Pkcs11Hsm."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import AttributeSensitive, AttributeTypeInvalid, ObjectHandleInvalid
from pkcs11.mechanisms import GCMParams
from pkcs11.types import (
    DecryptMixin,
    DeriveMixin,
    EncryptMixin,
    Object,
    Session,
    SignMixin,
    UnwrapMixin,
    VerifyMixin,
    WrapMixin,
)
from pkcs11.util.ec import encode_named_curve_parameters

from hsmkeys.hsm.finder import ObjectFinder
from hsmkeys.hsm.pkcs11 import Pkcs11Hsm
from hsmkeys.models import KeySpec, KeyUsage, KeyVersionRef
from hsmkeys.testing.plugin import SoftHsmToken

pytestmark = pytest.mark.hsm

MIXINS = (EncryptMixin, DecryptMixin, SignMixin, VerifyMixin, WrapMixin, UnwrapMixin, DeriveMixin)


@pytest.fixture(scope="module")
def finder(softhsm_token: SoftHsmToken) -> ObjectFinder:
    return ObjectFinder(softhsm_token.module)


def unique_id() -> bytes:
    return b"finder-" + uuid.uuid4().bytes


def shape(obj: Object) -> tuple[object, ...]:
    key_type = obj.key_type if hasattr(obj, "key_type") else None  # type: ignore[attr-defined]
    return (obj.object_class, key_type, tuple(isinstance(obj, mixin) for mixin in MIXINS))


@pytest.fixture(scope="module")
def session_objects(raw_session: Session) -> Iterator[bytes]:
    """Session objects of several kinds under one CKA_ID (gone with the session)."""
    object_id = unique_id()
    raw_session.generate_key(KeyType.AES, 256, id=object_id, label="finder-aes", store=False)
    raw_session.generate_keypair(KeyType.RSA, 2048, id=object_id, label="finder-rsa", store=False)
    params = raw_session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
    )
    params.generate_keypair(id=object_id, label="finder-ec", store=False)
    raw_session.generate_key(
        KeyType.GENERIC_SECRET, 256, id=object_id, label="finder-hmac", store=False
    )
    yield object_id


def test_found_objects_have_python_pkcs11s_class_key_type_and_capabilities(
    finder: ObjectFinder, raw_session: Session, session_objects: bytes
) -> None:
    ours = finder.find(raw_session, {Attribute.ID: session_objects})
    theirs = list(raw_session.get_objects({Attribute.ID: session_objects}))
    assert len(ours) == len(theirs) == 6
    assert sorted(map(repr, map(shape, ours))) == sorted(map(repr, map(shape, theirs)))
    by_label = {(o[Attribute.LABEL], o.object_class): o for o in theirs}
    for obj in ours:
        twin = by_label[(obj[Attribute.LABEL], obj.object_class)]
        assert obj.handle == twin.handle and obj[Attribute.ID] == session_objects


def test_a_found_key_encrypts_and_decrypts_like_python_pkcs11s(
    finder: ObjectFinder, raw_session: Session, session_objects: bytes
) -> None:
    (ours,) = finder.find(
        raw_session,
        {
            Attribute.ID: session_objects,
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
        },
    )
    (theirs,) = raw_session.get_objects(
        {Attribute.ID: session_objects, Attribute.KEY_TYPE: KeyType.AES}
    )
    assert isinstance(ours, EncryptMixin) and isinstance(theirs, DecryptMixin)
    params = GCMParams(os.urandom(12), b"aad", 128)
    sealed = ours.encrypt(b"plaintext", mechanism=Mechanism.AES_GCM, mechanism_param=params)
    assert (
        theirs.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=params) == b"plaintext"
    )


def test_attribute_reads_follow_python_pkcs11s_rules(
    finder: ObjectFinder, raw_session: Session, session_objects: bytes
) -> None:
    (aes,) = finder.find(
        raw_session, {Attribute.ID: session_objects, Attribute.LABEL: "finder-aes"}
    )
    assert aes[Attribute.VALUE_LEN] == 32  # not read at find time: read now
    assert aes.get_attributes([Attribute.LABEL, Attribute.VALUE_LEN, Attribute.MODULUS]) == {
        Attribute.LABEL: "finder-aes",
        Attribute.VALUE_LEN: 32,
    }  # an unavailable attribute is left out, as python-pkcs11 does
    with pytest.raises(AttributeTypeInvalid):
        aes[Attribute.MODULUS]
    rsa_public = finder.find(
        raw_session,
        {
            Attribute.ID: session_objects,
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
        },
    )[0]
    (twin,) = raw_session.get_objects(
        {
            Attribute.ID: session_objects,
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
        }
    )
    assert rsa_public[Attribute.MODULUS] == twin[Attribute.MODULUS]
    assert rsa_public.get_attributes([Attribute.PUBLIC_EXPONENT]) == twin.get_attributes(
        [Attribute.PUBLIC_EXPONENT]
    )


def test_a_sensitive_value_stays_unreadable(finder: ObjectFinder, raw_session: Session) -> None:
    object_id = unique_id()
    raw_session.generate_key(
        KeyType.AES, 256, id=object_id, label="finder-sensitive", store=False,
        template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
    )  # fmt: skip
    (key,) = finder.find(raw_session, {Attribute.ID: object_id})
    with pytest.raises(AttributeSensitive):
        key[Attribute.VALUE]
    assert Attribute.VALUE not in key.get_attributes([Attribute.VALUE, Attribute.VALUE_LEN])


def test_a_long_id_and_label_are_read_exactly(finder: ObjectFinder, raw_session: Session) -> None:
    object_id, label = os.urandom(300), "ł" * 400  # longer than the find-time buffers
    raw_session.generate_key(KeyType.AES, 256, id=object_id, label=label, store=False)
    (key,) = finder.find(raw_session, {Attribute.ID: object_id})
    assert (key[Attribute.ID], key[Attribute.LABEL], key.key_type) == (
        object_id,
        label,
        KeyType.AES,
    )
    assert isinstance(key, EncryptMixin)


def test_an_object_destroyed_after_the_search_is_left_out(
    finder: ObjectFinder, raw_session: Session
) -> None:
    object_id = unique_id()
    for n in range(3):
        raw_session.generate_key(
            KeyType.AES, 256, id=object_id, label=f"finder-gone-{n}", store=False
        )
    handles = finder._handles(raw_session, {Attribute.ID: object_id})
    (victim,) = raw_session.get_objects({Attribute.ID: object_id, Attribute.LABEL: "finder-gone-1"})
    victim.destroy()
    left = finder._built(raw_session, handles)
    assert sorted(o[Attribute.LABEL] for o in left) == ["finder-gone-0", "finder-gone-2"]


def test_an_object_every_read_of_which_fails_is_left_out(
    softhsm_token: SoftHsmToken, raw_session: Session
) -> None:
    """A key file torn by a SIGKILLed writer: SoftHSM2 answered each C_GetAttributeValue of
    it CKR_ATTRIBUTE_VALUE_INVALID (seen in CI under the crash harness), which failed the
    whole pass, so doctor could not run. The search leaves such an object out."""
    finder = ObjectFinder(softhsm_token.module)  # its own: the read is wrapped below
    object_id = unique_id()
    for n in range(3):
        raw_session.generate_key(KeyType.AES, 256, id=object_id, label=f"finder-torn-{n}", store=False)
    handles = finder._handles(raw_session, {Attribute.ID: object_id})
    torn = handles[1]
    real = finder._get_attribute_value

    def read(session: int, handle: int, template: object, count: int) -> int:
        return 0x13 if handle == torn else int(real(session, handle, template, count))  # CKR_ATTRIBUTE_VALUE_INVALID

    finder._get_attribute_value = read  # type: ignore[method-assign,assignment]
    left = finder._built(raw_session, handles)
    assert sorted(o[Attribute.LABEL] for o in left) == ["finder-torn-0", "finder-torn-2"]


def test_destroy_through_a_found_object(finder: ObjectFinder, raw_session: Session) -> None:
    object_id = unique_id()
    raw_session.generate_key(KeyType.AES, 256, id=object_id, label="finder-destroy", store=False)
    (key,) = finder.find(raw_session, {Attribute.ID: object_id})
    key.destroy()
    assert finder.find(raw_session, {Attribute.ID: object_id}) == []
    with pytest.raises(ObjectHandleInvalid):
        key[Attribute.VALUE_LEN]


def test_a_full_pass_finishes_while_searches_never_stop(
    finder: ObjectFinder, raw_session: Session, softhsm_token: SoftHsmToken, session_objects: bytes
) -> None:
    """The pass pauses for searches, but never longer than it has worked: not starved.

    Real searches run on another session throughout, and one more is held "in
    progress" for the whole pass, so the pass never sees a moment without a search.
    """
    other = pkcs11.lib(softhsm_token.module).get_token(token_label=softhsm_token.label).open()
    stop = threading.Event()
    searches = 0

    def search_forever() -> None:
        nonlocal searches
        while not stop.is_set():
            finder.find(other, {Attribute.ID: session_objects})
            searches += 1

    searcher = threading.Thread(target=search_forever, daemon=True)
    searcher.start()
    with finder._quiet:
        finder._searching += 1  # a search that does not end before the pass does
    try:
        done: list[list[Object]] = []
        scan = threading.Thread(target=lambda: done.append(finder.find(raw_session)), daemon=True)
        started = time.monotonic()
        scan.start()
        scan.join(60)
        assert done, f"the full pass did not finish in {time.monotonic() - started:.0f} s"
        assert len([o for o in done[0] if o[Attribute.ID] == session_objects]) == 6
    finally:
        with finder._quiet:
            finder._searching -= 1
            finder._quiet.notify_all()
        stop.set()
        searcher.join(10)
        other.close()
    assert searches > 0


def test_pkcs11hsm_recovers_a_session_lost_under_a_search(
    hsm: Pkcs11Hsm, softhsm_token: SoftHsmToken
) -> None:
    """A finder call on a dead session raises python-pkcs11's SessionHandleInvalid, which
    Pkcs11Hsm answers as for its other calls: new session, one retry."""
    ref = KeyVersionRef(uuid.uuid4(), 1)
    hsm.create_key(ref, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    fresh = Pkcs11Hsm.open(
        module=softhsm_token.module, token_label=softhsm_token.label, pin=softhsm_token.pin
    )
    try:
        fresh._shared.session.close()  # type: ignore[union-attr]  # gone under the instance's feet
        sealed = fresh.encrypt_aes_gcm(
            ref, b"\x01" * 12, b"aad", b"plaintext"
        )  # first use: a search
        assert hsm.decrypt_aes_gcm(ref, b"\x01" * 12, b"aad", sealed) == b"plaintext"
    finally:
        fresh.close()
        hsm.destroy_key(ref)
