"""The pytest plugin's HTTP endpoint: ``hsmkeys_kms`` / ``hsmkeys_kms_client``, and
``start_ephemeral_kms`` underneath them."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from hsmkeys.testing.server import start_ephemeral_kms

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.server


def test_kms_client_fixture_round_trips_and_lists_the_key(hsmkeys_kms_client: KMSClient) -> None:
    key_id = hsmkeys_kms_client.create_key(Description="plugin")["KeyMetadata"]["KeyId"]
    sealed = hsmkeys_kms_client.encrypt(KeyId=key_id, Plaintext=b"plugin round trip")
    opened = hsmkeys_kms_client.decrypt(CiphertextBlob=sealed["CiphertextBlob"])
    assert opened["Plaintext"] == b"plugin round trip"
    assert opened["KeyId"].endswith(f":key/{key_id}")
    pages = hsmkeys_kms_client.get_paginator("list_keys").paginate()
    assert key_id in {key["KeyId"] for page in pages for key in page["Keys"]}


def test_ephemeral_kms_ignores_the_callers_settings_and_stops_on_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIACALLERSOWNKEY000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-servers")
    monkeypatch.setenv("HSMKEYS_CONFIG", "/nonexistent/hsmkeys.yaml")
    monkeypatch.setenv("SOFTHSM2_CONF", "/nonexistent/softhsm2.conf")
    with start_ephemeral_kms() as kms:
        assert re.fullmatch(r"AKIA[A-Z0-9]{16}", kms.access_key_id)
        assert len(kms.secret_access_key) == 40
        assert kms.url == f"http://127.0.0.1:{kms.port}"
        assert len(kms.client().generate_random(NumberOfBytes=16)["Plaintext"]) == 16
    assert kms.process.returncode == 0


def test_installed_plugin_serves_a_users_own_suite(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)  # entry point only
    pytester.makepyfile(
        test_user_code="""
        def seal(kms, key_id, secret):
            return kms.encrypt(KeyId=key_id, Plaintext=secret)["CiphertextBlob"]

        def test_my_envelope_code(hsmkeys_kms_client):
            key_id = hsmkeys_kms_client.create_key()["KeyMetadata"]["KeyId"]
            blob = seal(hsmkeys_kms_client, key_id, b"user secret")
            assert hsmkeys_kms_client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"user secret"

        def test_endpoint_for_code_that_builds_its_own_client(hsmkeys_kms):
            import boto3

            client = boto3.client(
                "kms",
                endpoint_url=hsmkeys_kms.url,
                region_name=hsmkeys_kms.region,
                aws_access_key_id=hsmkeys_kms.access_key_id,
                aws_secret_access_key=hsmkeys_kms.secret_access_key,
            )
            assert client.list_keys()["Keys"]
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2)


def test_start_ephemeral_kms_refuses_no_audit_before_starting_anything() -> None:
    with pytest.raises(ValueError, match="--no-audit"):
        start_ephemeral_kms("--no-audit")
