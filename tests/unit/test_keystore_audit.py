"""The audit trail as the operation table applies it: one line per call of every
operation, intent before effect for state changes, and fail closed."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_keystore_authz import ADMIN, BYSTANDER, _request_for, as_caller

from hsmkeys.audit import AuditEvent, AuditLog
from hsmkeys.authz import compile_policy
from hsmkeys.authz.model import Principal
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.errors import KMSError, KMSInternalException
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore
from hsmkeys.operations import OPERATIONS

ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]})


class _Audit(AuditLog):
    """An audit log that can be told to fail, as a full disk would."""

    fail = False

    def record(self, event: AuditEvent) -> None:
        if self.fail:
            raise KMSInternalException("the audit log cannot be written")
        super().record(event)


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[KeyStore, MemoryHsm, SqliteCatalog, _Audit, Path]]:
    hsm = MemoryHsm()
    catalog = SqliteCatalog(tmp_path / "catalog.db")
    mac_store = KeyStore(hsm=hsm, catalog=catalog)
    log = tmp_path / "audit.log"
    audit = _Audit(log, mac=mac_store.audit_mac, checkpoints=catalog)
    admin = Principal(ADMIN, identity_policy=compile_policy(ALLOW_ALL, kind="identity"))
    store = KeyStore(hsm=hsm, catalog=catalog, clock=FakeClock(), audit=audit, principals={ADMIN: admin})
    yield store, hsm, catalog, audit, log
    audit.close()
    catalog.close()


def _lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_every_operation_in_the_table_writes_its_line_named_by_its_kms_operation(parts: Any) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    store, _, _, _, log = parts
    with as_caller(store, ADMIN):
        keys: dict[str, Any] = {
            "sym": store.create_key().key_metadata.arn,
            "sign": store.create_key(key_spec="ECC_NIST_P256", key_usage="SIGN_VERIFY").key_metadata.arn,
            "mac": store.create_key(key_spec="HMAC_256", key_usage="GENERATE_VERIFY_MAC").key_metadata.arn,
            "ecdh": store.create_key(key_spec="ECC_NIST_P256", key_usage="KEY_AGREEMENT").key_metadata.arn,
        }
        keys["peer"] = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        store.create_alias(alias_name="alias/existing", target_key_id=keys["sym"])
        blob = store.encrypt(key_id=keys["sym"], plaintext=b"x").ciphertext_blob
        grant = store.create_grant(key_id=keys["sym"], grantee_principal=ADMIN, operations=["Encrypt"])
    # The bystander walks every operation first (it sees the state set up above), then the admin.
    for caller in (BYSTANDER, ADMIN):
        for index, (name, op) in enumerate(sorted(OPERATIONS.items())):
            with as_caller(store, caller):
                request_id = f"walk-{index}-{caller[-5:]}"
                with contextlib.suppress(KMSError):  # refused or invalid for this key: still one line
                    store.invoke(
                        op,
                        _request_for(name, keys, blob, grant.grant_id),
                        principal=store.principal(caller),
                        request_id=request_id,
                    )
    lines = _lines(log)
    for index, (name, op) in enumerate(sorted(OPERATIONS.items())):
        for caller in (ADMIN, BYSTANDER):
            request_id = f"walk-{index}-{caller[-5:]}"
            done = [x for x in lines if x.get("request_id") == request_id and x.get("phase") == "done"]
            assert len(done) == 1, (name, caller)
            assert done[0]["operation"] == name and done[0]["principal"] == caller
            if caller == BYSTANDER or done[0]["outcome"] == "Success":
                assert done[0]["decision"], name
            intents = [x for x in lines if x.get("request_id") == request_id and x.get("phase") == "intent"]
            assert len(intents) == (1 if op.mutating else 0), name
    bystander = [x for x in lines if x.get("principal") == BYSTANDER and x.get("phase") == "done"]
    assert {x["outcome"] for x in bystander} == {"AccessDeniedException"}
    assert all(x["decision"].startswith("deny ") for x in bystander)
    re_encrypt = next(x for x in lines if x.get("operation") == "ReEncrypt" and x.get("principal") == ADMIN
                      and x.get("phase") == "done")
    assert re_encrypt["outcome"] == "Success" and re_encrypt["key_arns"] == [keys["sym"]]


def test_re_encrypt_records_both_keys(parts: Any) -> None:
    store, _, _, _, log = parts
    source = store.create_key().key_metadata.arn
    destination = store.create_key().key_metadata.arn
    blob = store.encrypt(key_id=source, plaintext=b"x").ciphertext_blob
    store.re_encrypt(ciphertext_blob=blob, destination_key_id=destination)
    line = [x for x in _lines(log) if x.get("operation") == "ReEncrypt"][-1]
    assert line["key_arns"] == [source, destination]


def test_an_audit_failure_before_a_state_change_leaves_nothing_changed(parts: Any) -> None:
    store, hsm, catalog, audit, _ = parts
    before_objects, before_rows = hsm.list_key_refs(), catalog.count_keys()
    audit.fail = True
    with pytest.raises(KMSInternalException):
        store.create_key()
    assert hsm.list_key_refs() == before_objects and catalog.count_keys() == before_rows
    audit.fail = False
    key = store.create_key().key_metadata.arn
    audit.fail = True
    with pytest.raises(KMSInternalException):
        store.disable_key(key_id=key)
    with pytest.raises(KMSInternalException):
        store.schedule_key_deletion(key_id=key)
    audit.fail = False
    assert store.describe_key(key_id=key).key_metadata.key_state == "Enabled"


def test_a_cryptographic_result_is_never_returned_unaudited(parts: Any) -> None:
    store, _, _, audit, _ = parts
    key = store.create_key().key_metadata.arn
    audit.fail = True
    with pytest.raises(KMSInternalException):
        store.encrypt(key_id=key, plaintext=b"secret")
    with pytest.raises(KMSInternalException):
        store.generate_data_key(key_id=key, key_spec="AES_256")


def test_no_line_holds_plaintext_data_keys_or_context_values(parts: Any) -> None:
    store, _, _, _, log = parts
    key = store.create_key().key_metadata.arn
    marker = b"PLAINTEXT-MARKER-7f3a"
    blob = store.encrypt(key_id=key, plaintext=marker, encryption_context={"tenant": "CONTEXT-VALUE-91"})
    data_key = store.generate_data_key(key_id=key, key_spec="AES_256").plaintext
    store.decrypt(ciphertext_blob=blob.ciphertext_blob, encryption_context={"tenant": "CONTEXT-VALUE-91"})
    raw = log.read_bytes()
    assert marker not in raw and b"CONTEXT-VALUE-91" not in raw and data_key.hex().encode() not in raw


def test_unauthenticated_refusals_are_summarised_once_per_source_per_second(parts: Any) -> None:
    store, _, _, _, log = parts
    for _ in range(50):
        store.audit_rejected("Encrypt", "IncompleteSignatureException", source="10.0.0.9")
    store.audit_rejected("Encrypt", "IncompleteSignatureException", source="10.0.0.8")
    assert not [x for x in _lines(log) if x.get("count")]  # the windows are still open
    store._clock.advance(seconds=1.5)  # type: ignore[attr-defined]
    store.flush_rejections(older_than=1.0)
    summaries = {x["source"]: x for x in _lines(log) if x.get("count")}
    assert summaries["10.0.0.9"]["count"] == 50 and summaries["10.0.0.8"]["count"] == 1
    assert summaries["10.0.0.9"]["principal"] is None
