"""KmsApi: LocalKms (the server's wire layer in process) and Boto3Kms (a real endpoint)."""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hsmkeys.errors import KMSError, NotFoundException, ValidationException
from hsmkeys.kmsclient import Boto3Kms, KmsTransportError, LocalKms, error_for_code
from hsmkeys.provision.command import main as provision_main

if TYPE_CHECKING:
    from hsmkeys.testing.server import EphemeralKms


def test_local_kms_takes_and_returns_bytes_and_datetimes(kms: LocalKms) -> None:
    md = kms.call("CreateKey", {"Description": "x"})["KeyMetadata"]
    assert isinstance(md["CreationDate"], datetime)
    blob = kms.call("Encrypt", {"KeyId": md["KeyId"], "Plaintext": b"\x00secret"})["CiphertextBlob"]
    assert isinstance(blob, bytes)
    assert kms.call("Decrypt", {"CiphertextBlob": blob})["Plaintext"] == b"\x00secret"


def test_local_kms_raises_the_error_class_of_the_code(kms: LocalKms) -> None:
    with pytest.raises(NotFoundException):
        kms.call("DescribeKey", {"KeyId": str(uuid.uuid4())})
    with pytest.raises(ValidationException, match="keySpec"):
        kms.call("CreateKey", {"KeySpec": "AES_999"})


def test_unknown_error_code_keeps_its_code() -> None:
    error = error_for_code("SomeNewException", "new")
    assert (type(error), error.code, error.message) == (KMSError, "SomeNewException", "new")
    assert type(error_for_code("NotFoundException", "m")) is NotFoundException


def test_boto3_kms_without_credentials_is_a_transport_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    api = Boto3Kms.connect(endpoint_url="http://127.0.0.1:9", region="us-east-1")
    with pytest.raises(KmsTransportError, match="credentials"):
        api.call("ListKeys", {})


@pytest.mark.server
def test_boto3_kms_maps_client_errors_to_kms_errors(hsmkeys_kms: EphemeralKms) -> None:
    api = Boto3Kms(hsmkeys_kms.client())
    with pytest.raises(NotFoundException):
        api.call("DescribeKey", {"KeyId": str(uuid.uuid4())})
    with pytest.raises(ValidationException):  # botocore's own check, before sending
        api.call("CreateKey", {"Description": 5})


@pytest.mark.server
def test_plan_and_apply_against_an_endpoint(
    hsmkeys_kms: EphemeralKms, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", hsmkeys_kms.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", hsmkeys_kms.secret_access_key)
    suffix = uuid.uuid4().hex[:8]  # the server is shared by the session
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"""\
keys:
  - alias: alias/e2e-{suffix}
    description: over HTTP
    rotation: {{enabled: true, period_days: 90}}
    tags: {{team: e2e}}
    extra_aliases: [alias/e2e-{suffix}-extra]
  - alias: alias/e2e-{suffix}-mac
    key_spec: HMAC_384
""",
        encoding="utf-8",
    )
    args = [str(path), "--endpoint", hsmkeys_kms.url, "--region", hsmkeys_kms.region]
    assert provision_main(["plan", *args]) == 2
    assert provision_main(["apply", *args, "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"+ create alias/e2e-{suffix} (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT)" in out
    assert provision_main(["plan", *args]) == 0
    assert capsys.readouterr().out == "no changes\n"

    client = hsmkeys_kms.client()
    key = client.describe_key(KeyId=f"alias/e2e-{suffix}")["KeyMetadata"]
    assert key["Description"] == "over HTTP"
    client.update_key_description(KeyId=key["KeyId"], Description="drifted")
    assert provision_main(["plan", *args]) == 2
    assert "description: 'drifted' → 'over HTTP'" in capsys.readouterr().out
    assert provision_main(["apply", *args, "--yes"]) == 0
    assert client.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["Description"] == "over HTTP"


@pytest.mark.server
def test_apply_imports_known_material_through_a_softhsm_server(
    hsmkeys_kms: EphemeralKms, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SoftHSM2 cannot unwrap SHA-256 OAEP: apply falls back to the SHA-1 wrapping and the
    server's key then holds exactly the known material (an HMAC known answer)."""
    import hashlib
    import hmac

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", hsmkeys_kms.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", hsmkeys_kms.secret_access_key)
    suffix = uuid.uuid4().hex[:8]
    secret = bytes(range(48))
    (tmp_path / "mac.key").write_bytes(secret)
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - alias: alias/imported-{suffix}\n    origin: EXTERNAL\n    key_spec: HMAC_384\n"
        f"    key_material_file: mac.key\n",
        encoding="utf-8",
    )
    args = [str(path), "--endpoint", hsmkeys_kms.url, "--region", hsmkeys_kms.region]
    assert provision_main(["apply", *args, "--yes"]) == 0
    assert provision_main(["plan", *args]) == 0
    tag = hsmkeys_kms.client().generate_mac(
        KeyId=f"alias/imported-{suffix}", Message=b"known", MacAlgorithm="HMAC_SHA_384"
    )["Mac"]
    assert tag == hmac.new(secret, b"known", hashlib.sha384).digest()


def test_hsmkeys_provision_subcommand_runs_the_same_code(
    store: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hsmkeys.cli import main as hsmkeys_main

    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - alias: alias/cli\n", encoding="utf-8")
    opener = lambda: contextlib.nullcontext(store)  # noqa: E731
    assert hsmkeys_main(["provision", "plan", str(path)], open_store=opener) == 2  # type: ignore[arg-type]
    assert capsys.readouterr().out.splitlines()[0] == "+ create alias/cli (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT)"
    assert hsmkeys_main(["provision", "apply", str(path), "--yes"], open_store=opener) == 0  # type: ignore[arg-type]
    assert hsmkeys_main(["provision", "plan", str(path), "--json"], open_store=opener) == 0  # type: ignore[arg-type]
    assert '"pending": false' in capsys.readouterr().out
