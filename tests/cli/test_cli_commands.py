"""``hsmkeys`` commands in-process against a KeyStore on the in-memory HSM."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from hsmkeys.audit import AuditLog
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.cli import main
from hsmkeys.clock import FakeClock
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore
from hsmkeys.models import KeySpec, KeyUsage, KeyVersionRef

from .conftest import Ran, RunCli, run_main


def _error_line(ran: Ran, code: str) -> None:
    """Exit 2 with exactly one stderr line naming the error code, and no traceback."""
    assert ran.code == 2, ran
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1, ran.err
    assert lines[0].startswith(f"error: {code}: "), ran.err
    assert "Traceback" not in ran.err


def _create(cli: RunCli, *args: str) -> str:
    ran = cli("--json", "keys", "create", *args)
    assert ran.code == 0, ran
    key_id: str = json.loads(ran.out)["KeyMetadata"]["KeyId"]
    return key_id


def test_a_positional_argparse_leaves_empty_is_a_usage_error(cli: RunCli) -> None:
    # Python 3.11's argparse gives FILE = [] here; it reached Path([]) as a TypeError.
    ran = cli("keys", "policy", "put", "--", "-h", "--")
    assert ran.code == 2 and "argument FILE: expected one argument" in ran.err, ran
    assert "Traceback" not in ran.err


# ------------------------------------------------------------------ keys


def test_keys_create_json_is_the_kms_create_key_response(cli: RunCli, clock: FakeClock) -> None:
    ran = cli("--json", "keys", "create", "--description", "orders", "--tag", "team=pay")
    assert ran.code == 0, ran
    md = json.loads(ran.out)["KeyMetadata"]
    assert md["Arn"] == f"arn:aws:kms:us-east-1:111122223333:key/{md['KeyId']}"
    assert md["KeyState"] == "Enabled" and md["Enabled"] is True
    assert md["KeySpec"] == "SYMMETRIC_DEFAULT" and md["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert md["EncryptionAlgorithms"] == ["SYMMETRIC_DEFAULT"]
    assert md["CreationDate"] == clock.now().timestamp()
    assert md["Description"] == "orders" and md["AWSAccountId"] == "111122223333"
    assert "CurrentVersion" not in md and "current_version" not in md


def test_json_flag_works_before_and_after_the_command(cli: RunCli, key_id: str) -> None:
    before = cli("--json", "keys", "describe", key_id)
    after = cli("keys", "describe", key_id, "--json")
    assert before.code == after.code == 0
    assert json.loads(before.out) == json.loads(after.out)
    assert json.loads(after.out)["KeyMetadata"]["KeyId"] == key_id


def test_keys_describe_by_alias_shows_aliases_and_tags(cli: RunCli) -> None:
    key_id = _create(cli, "--tag", "env=prod", "--description", "billing")
    assert cli("alias", "create", "billing", key_id).code == 0
    ran = cli("keys", "describe", "alias/billing")
    assert ran.code == 0, ran
    assert f"KeyId         {key_id}" in ran.text
    assert "alias/billing" in ran.text and "env=prod" in ran.text and "billing" in ran.text


def test_keys_list_shows_state_spec_and_aliases(cli: RunCli) -> None:
    sym = _create(cli, "--description", "sym")
    mac = _create(cli, "--key-spec", "HMAC_256", "--key-usage", "GENERATE_VERIFY_MAC")
    cli("alias", "create", "alias/m", mac)
    cli("keys", "disable", sym)
    ran = cli("keys", "list")
    assert ran.code == 0, ran
    rows = {line.split()[0]: line.split() for line in ran.text.splitlines()[1:]}
    assert rows[sym][1:3] == ["Disabled", "SYMMETRIC_DEFAULT"]
    assert rows[mac][1:4] == ["Enabled", "HMAC_256", "alias/m"]
    listed = json.loads(cli("--json", "keys", "list").out)
    assert {k["KeyId"] for k in listed["Keys"]} == {sym, mac}
    assert listed["Truncated"] is False


def test_keys_list_when_empty_says_how_to_create_one(cli: RunCli) -> None:
    ran = cli("keys", "list")
    assert ran.code == 0 and "keys create" in ran.text


def test_disabled_key_refuses_encrypt_until_enabled(cli: RunCli, key_id: str) -> None:
    assert cli("keys", "disable", key_id).text.strip() == f"{key_id}: Disabled"
    _error_line(cli("encrypt", "--key-id", key_id, stdin=b"x"), "DisabledException")
    assert cli("keys", "enable", key_id).text.strip() == f"{key_id}: Enabled"
    assert cli("encrypt", "--key-id", key_id, stdin=b"x").code == 0


def test_unknown_key_is_one_line_not_found(cli: RunCli) -> None:
    _error_line(cli("keys", "describe", str(uuid.uuid4())), "NotFoundException")


def test_rotate_symmetric_key_makes_version_2_and_old_blobs_still_decrypt(cli: RunCli, key_id: str) -> None:
    blob = cli("encrypt", "--key-id", key_id, stdin=b"before").out
    ran = cli("keys", "rotate", key_id)
    assert ran.code == 0 and "current version 2" in ran.text
    assert cli("decrypt", stdin=blob).out == b"before"


def test_rotate_hmac_key_is_unsupported(cli: RunCli) -> None:
    mac = _create(cli, "--key-spec", "HMAC_256", "--key-usage", "GENERATE_VERIFY_MAC")
    _error_line(cli("keys", "rotate", mac), "UnsupportedOperationException")


def test_scheduled_deletion_is_purged_by_maintain_after_the_window(
    cli: RunCli, key_id: str, clock: FakeClock
) -> None:
    ran = cli("keys", "schedule-deletion", key_id, "--days", "7")
    assert ran.code == 0 and "PendingDeletion" in ran.text and "(7 days)" in ran.text
    _error_line(cli("encrypt", "--key-id", key_id, stdin=b"x"), "KMSInvalidStateException")
    assert cli("maintain").text.strip() == "nothing due"
    clock.advance(days=8)
    assert json.loads(cli("--json", "maintain").out) == {"rotated": [], "purged": [key_id], "swept": []}
    _error_line(cli("keys", "describe", key_id), "NotFoundException")


def test_cancel_deletion_leaves_the_key_disabled(cli: RunCli, key_id: str) -> None:
    cli("keys", "schedule-deletion", key_id)
    assert cli("keys", "cancel-deletion", key_id).code == 0
    assert json.loads(cli("--json", "keys", "describe", key_id).out)["KeyMetadata"]["KeyState"] == "Disabled"


def test_schedule_deletion_window_out_of_range_is_validation_error(cli: RunCli, key_id: str) -> None:
    _error_line(cli("keys", "schedule-deletion", key_id, "--days", "3"), "ValidationException")


# ------------------------------------------------------------------ aliases


def test_alias_create_list_delete(cli: RunCli, key_id: str) -> None:
    assert cli("alias", "create", "app", key_id).text.strip() == f"alias/app -> {key_id}"
    # The predefined AWS managed key aliases are listed too, without a target until first use.
    assert cli("alias", "list").text.splitlines()[:2] == [f"alias/app -> {key_id}", "alias/aws/acm -> -"]
    aliases = json.loads(cli("--json", "alias", "list").out)["Aliases"]
    assert [a["AliasName"] for a in aliases if "TargetKeyId" in a] == ["alias/app"]
    _error_line(cli("alias", "create", "app", key_id), "AlreadyExistsException")
    assert cli("alias", "delete", "alias/app").code == 0
    assert all(line.startswith("alias/aws/") for line in cli("alias", "list").text.splitlines())


# ------------------------------------------------------------------ encrypt / decrypt


def test_encrypt_decrypt_round_trip_of_binary_plaintext_with_context(cli: RunCli, key_id: str) -> None:
    plaintext = bytes(range(256))
    enc = cli("encrypt", "--key-id", key_id, "--context", "app=orders", "--context", "n=1", stdin=plaintext)
    assert enc.code == 0, enc
    blob = enc.out.strip()
    base64.b64decode(blob, validate=True)
    dec = cli("decrypt", "--context", "n=1", "--context", "app=orders", stdin=enc.out)
    assert dec.code == 0, dec
    assert dec.out == plaintext


def test_decrypt_with_other_context_is_invalid_ciphertext(cli: RunCli, key_id: str) -> None:
    blob = cli("encrypt", "--key-id", key_id, "--context", "app=orders", stdin=b"secret").out
    ran = cli("decrypt", "--context", "app=billing", stdin=blob)
    _error_line(ran, "InvalidCiphertextException")
    assert ran.out == b""


def test_decrypt_naming_another_key_is_incorrect_key(cli: RunCli, key_id: str) -> None:
    other = _create(cli)
    blob = cli("encrypt", "--key-id", key_id, stdin=b"secret").out
    _error_line(cli("decrypt", "--key-id", other, stdin=blob), "IncorrectKeyException")


def test_decrypt_of_text_that_is_not_base64_is_input_error(cli: RunCli) -> None:
    _error_line(cli("decrypt", stdin=b"not base64!"), "InputError")


def test_encrypt_json_and_in_file(cli: RunCli, key_id: str, tmp_path: Path) -> None:
    (tmp_path / "msg").write_bytes(b"from a file")
    ran = cli("--json", "encrypt", "--key-id", key_id, "--in", str(tmp_path / "msg"))
    body = json.loads(ran.out)
    assert body["KeyId"].endswith(key_id) and body["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    (tmp_path / "blob").write_text(body["CiphertextBlob"])
    assert cli("decrypt", "--in", str(tmp_path / "blob")).out == b"from a file"
    dec = json.loads(cli("--json", "decrypt", "--in", str(tmp_path / "blob")).out)
    assert base64.b64decode(dec["Plaintext"]) == b"from a file"


def test_missing_in_file_is_input_error(cli: RunCli, key_id: str, tmp_path: Path) -> None:
    ran = cli("encrypt", "--key-id", key_id, "--in", str(tmp_path / "absent"))
    _error_line(ran, "InputError")
    assert "absent" in ran.err


def test_malformed_context_argument_is_a_usage_error(cli: RunCli, key_id: str) -> None:
    ran = cli("encrypt", "--key-id", key_id, "--context", "novalue", stdin=b"x")
    assert ran.code == 2 and "expected KEY=VALUE" in ran.err


def test_context_key_given_twice_is_input_error(cli: RunCli, key_id: str) -> None:
    ran = cli("encrypt", "--key-id", key_id, "--context", "a=1", "--context", "a=2", stdin=b"x")
    _error_line(ran, "InputError")


# ------------------------------------------------------------------ sign / verify / public key / mac


def test_sign_and_verify_ecdsa(cli: RunCli) -> None:
    key = _create(cli, "--key-spec", "ECC_NIST_P256", "--key-usage", "SIGN_VERIFY")
    signed = cli("sign", "--key-id", key, "--algorithm", "ECDSA_SHA_256", stdin=b"message")
    assert signed.code == 0, signed
    signature = signed.text.strip()
    good = cli("verify", "--key-id", key, "--algorithm", "ECDSA_SHA_256", "--signature", signature, stdin=b"message")
    assert (good.code, good.text.strip()) == (0, "signature valid")
    bad = cli("verify", "--key-id", key, "--algorithm", "ECDSA_SHA_256", "--signature", signature, stdin=b"massage")
    assert (bad.code, bad.text.strip()) == (1, "signature invalid")
    as_json = cli(
        "--json", "verify", "--key-id", key, "--algorithm", "ECDSA_SHA_256", "--signature", signature, stdin=b"x"
    )
    assert as_json.code == 1 and json.loads(as_json.out)["SignatureValid"] is False


def test_sign_with_an_algorithm_the_key_lacks_is_invalid_key_usage(cli: RunCli) -> None:
    key = _create(cli, "--key-spec", "ECC_NIST_P256", "--key-usage", "SIGN_VERIFY")
    ran = cli("sign", "--key-id", key, "--algorithm", "RSASSA_PSS_SHA_256", stdin=b"m")
    _error_line(ran, "InvalidKeyUsageException")


def test_public_key_pem_and_der_are_the_same_key(cli: RunCli) -> None:
    key = _create(cli, "--key-spec", "RSA_2048", "--key-usage", "SIGN_VERIFY")
    pem = cli("public-key", key)
    der = cli("public-key", key, "--der")
    assert pem.code == der.code == 0
    assert pem.text.startswith("-----BEGIN PUBLIC KEY-----\n")
    loaded = serialization.load_pem_public_key(pem.out)
    spki = loaded.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert spki == der.out
    body = json.loads(cli("--json", "public-key", key).out)
    assert base64.b64decode(body["PublicKey"]) == der.out and body["KeySpec"] == "RSA_2048"


def test_public_key_of_symmetric_key_is_unsupported(cli: RunCli, key_id: str) -> None:
    _error_line(cli("public-key", key_id), "UnsupportedOperationException")


def test_mac_and_verify_mac(cli: RunCli) -> None:
    key = _create(cli, "--key-spec", "HMAC_256", "--key-usage", "GENERATE_VERIFY_MAC")
    made = cli("mac", "--key-id", key, "--algorithm", "HMAC_SHA_256", stdin=b"data")
    assert made.code == 0 and len(base64.b64decode(made.out)) == 32
    mac = made.text.strip()
    good = cli("verify-mac", "--key-id", key, "--algorithm", "HMAC_SHA_256", "--mac", mac, stdin=b"data")
    assert (good.code, good.text.strip()) == (0, "mac valid")
    bad = cli("verify-mac", "--key-id", key, "--algorithm", "HMAC_SHA_256", "--mac", mac, stdin=b"date")
    assert (bad.code, bad.text.strip()) == (1, "mac invalid")


def test_mac_argument_that_is_not_base64_is_a_usage_error(cli: RunCli) -> None:
    ran = cli("verify-mac", "--key-id", "k", "--algorithm", "HMAC_SHA_256", "--mac", "***", stdin=b"d")
    assert ran.code == 2 and "not valid base64" in ran.err


# ------------------------------------------------------------------ status, doctor, audit


def test_status_shows_token_keys_and_a_usage_example(cli: RunCli, key_id: str) -> None:
    ran = cli("status")
    assert ran.code == 0, ran
    lines = ran.text.splitlines()
    assert lines[0].split()[:2] == ["token", "memory"] and lines[2].split() == ["keys", "1"]
    example = lines[lines.index("try:") + 1 :]
    assert len(example) == 3 and all(line.lstrip().split()[0] in ("hsmkeys", "printf") for line in example)
    assert json.loads(cli("--json", "status").out)["keys"] == 1


def test_doctor_on_a_consistent_store_exits_0(cli: RunCli, key_id: str) -> None:
    ran = cli("doctor")
    assert ran.code == 0 and ran.text.startswith("consistent")


def test_doctor_reports_an_orphan_and_fix_destroys_it_after_the_grace_period(
    cli: RunCli, memory_hsm_backend: MemoryHsm, key_id: str, clock: FakeClock
) -> None:
    orphan = KeyVersionRef(uuid.uuid4(), 1)
    memory_hsm_backend.create_key(orphan, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    found = cli("doctor")
    assert found.code == 1 and f"orphan HSM object {orphan.label}" in found.text
    assert "doctor --fix" in found.text
    cli("doctor", "--fix")
    assert memory_hsm_backend.has_key(orphan)  # first seen just now: a create may be in flight
    clock.advance(seconds=601)
    fixed = cli("--json", "doctor", "--fix")
    assert fixed.code == 1  # drift was found, even though it is now repaired
    assert json.loads(fixed.out)["fixed"] is True
    assert not memory_hsm_backend.has_key(orphan)
    assert cli("doctor").code == 0


def test_audit_verify_passes_then_names_the_tampered_line(
    memory_hsm_backend: MemoryHsm,
    catalog: SqliteCatalog,
    clock: FakeClock,
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log_path = tmp_path / "audit.log"
    mac_source = KeyStore(hsm=memory_hsm_backend, catalog=catalog, clock=clock)
    audit = AuditLog(log_path, mac=mac_source.audit_mac, checkpoints=catalog)
    audited = KeyStore(hsm=memory_hsm_backend, catalog=catalog, clock=clock, audit=audit)
    cli = run_main(audited, capsysbinary, monkeypatch)
    key = _create(cli)
    cli("encrypt", "--key-id", key, stdin=b"x")
    audit.checkpoint()  # sign the tail now (the writer does within a second)
    ok = cli("audit", "verify", str(log_path))
    assert ok.code == 0 and ok.text.startswith("intact:"), ok
    lines = log_path.read_text().splitlines(keepends=True)
    events = [json.loads(line) for line in lines]
    done = [e for e in events if e.get("phase") == "done"]
    assert [e["operation"] for e in done] == ["CreateKey", "Encrypt"]
    assert {e["source"] for e in done} == {"cli"}
    at = next(i for i, e in enumerate(events) if e.get("phase") == "done" and e["operation"] == "Encrypt")
    lines[at] = lines[at].replace('"Encrypt"', '"Decrypt"')
    log_path.write_text("".join(lines))
    bad = cli("audit", "verify", str(log_path))
    assert bad.code == 1 and f"line {at + 1}" in bad.text, bad


# ------------------------------------------------------------------ config errors (no injected store)


def test_bad_config_field_is_one_line_config_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "hsmkeys.yaml"
    config.write_text(
        "hsm:\n  module: /nonexistent/libsofthsm2.so\n  token_label: t\n  pin_file: pin\n"
        "catalog: catalog.db\nmaintenance_interval_seconds: soon\n"
    )
    assert main(["--config", str(config), "keys", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ConfigError: maintenance_interval_seconds") and err.count("\n") == 1


def test_missing_config_file_is_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "nope.yaml"), "status"]) == 2
    assert capsys.readouterr().err.startswith("error: ConfigError: config file")


def test_init_create_token_refuses_without_softhsm2_conf(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOFTHSM2_CONF", raising=False)
    config = tmp_path / "hsmkeys.yaml"
    config.write_text(
        "hsm:\n  module: /usr/lib/softhsm/libsofthsm2.so\n  token_label: t\n  pin_file: var/pin\n"
        "catalog: var/catalog.db\n"
    )
    assert main(["--config", str(config), "init", "--create-token"]) == 2
    assert "SOFTHSM2_CONF is not set" in capsys.readouterr().err
    assert not (tmp_path / "var").exists()


def test_init_create_token_refuses_a_module_that_is_not_softhsm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOFTHSM2_CONF", str(tmp_path / "var" / "softhsm2.conf"))
    config = tmp_path / "hsmkeys.yaml"
    config.write_text(
        "hsm:\n  module: /opt/vendor/libcloudhsm.so\n  token_label: t\n  pin_file: var/pin\ncatalog: var/catalog.db\n"
    )
    assert main(["--config", str(config), "init", "--create-token"]) == 2
    assert capsys.readouterr().err.startswith("error: ConfigError: hsm.module")


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out


def test_keys_import_puts_known_material_into_an_external_key(cli: RunCli, store: KeyStore, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from hsmkeys import ciphertext

    created = cli("--json", "keys", "create", "--origin", "EXTERNAL")
    key_id = json.loads(created.out)["KeyMetadata"]["KeyId"]
    assert json.loads(created.out)["KeyMetadata"]["KeyState"] == "PendingImport"
    material = tmp_path / "key.bin"
    material.write_bytes(bytes(range(32)))
    imported = cli("keys", "import", key_id, "--material-file", str(material))
    assert imported.code == 0 and "Enabled" in imported.text
    blob = ciphertext.unpack(store.encrypt(key_id=key_id, plaintext=b"kat").ciphertext_blob)
    assert AESGCM(bytes(range(32))).decrypt(blob.iv, blob.body, blob.header + ciphertext.canonical_context({})) == b"kat"
    material.write_bytes(b"short")
    refused = cli("keys", "import", key_id, "--material-file", str(material))
    assert refused.code != 0 and "32 raw bytes" in refused.err and "Traceback" not in refused.err


def test_maintain_does_nothing_while_another_instance_holds_the_lease(cli: RunCli, store: KeyStore) -> None:
    assert store.hold_maintenance_lease("server:other-host:1", 30)
    busy = cli("maintain")
    assert busy.code == 0 and "holds the maintenance lease" in busy.text
    store.release_maintenance_lease("server:other-host:1")
    assert cli("maintain").text.strip() == "nothing due"
    assert store.hold_maintenance_lease("server:other-host:1", 30)  # maintain gave the lease back
