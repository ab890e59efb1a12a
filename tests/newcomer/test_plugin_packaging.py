"""The pytest plugin as a user's throwaway project meets it: a fixture that cannot run
fails its test with one message saying what to install, never a silent skip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
INSTALL = "pip install 'hsmkeys[pytest]' and apt-get install softhsm2"

USES_CLIENT = """
def test_my_code(hsmkeys_kms_client):
    assert hsmkeys_kms_client.list_keys()["Keys"] is not None
"""
USES_HSM = """
def test_my_code(hsm_keystore):
    assert hsm_keystore.create_key().key_metadata.key_id
"""


def _message(fixture: str, problem: str) -> str:
    return f"hsmkeys fixture {fixture!r} cannot run: {problem}. Install its dependencies: {INSTALL}"


@pytest.fixture
def user_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)  # the entry point loads it
    monkeypatch.delenv("SOFTHSM2_CONF", raising=False)
    return pytester


def _without_boto3(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """``import boto3`` fails in the subprocess: a shadow module first on its sys.path."""
    shadow = pytester.mkdir("shadow")
    (shadow / "boto3.py").write_text('raise ImportError("No module named \'boto3\'")\n')
    monkeypatch.setenv("PYTHONPATH", str(shadow))


def _without_softhsm(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """softhsm2-util is not on PATH (the interpreter is started by its absolute path)."""
    monkeypatch.setenv("PATH", str(pytester.mkdir("empty-bin")))


def test_missing_boto3_fails_the_client_fixture_saying_what_to_install(
    user_project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_boto3(user_project, monkeypatch)
    user_project.makepyfile(test_user=USES_CLIENT)
    result = user_project.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    assert _message("hsmkeys_kms_client", "boto3 is not importable (No module named 'boto3')") in out
    assert "During handling" not in out and "listening on" not in out  # one message; no server started


def test_missing_softhsm_fails_the_hsm_fixtures_saying_what_to_install(
    user_project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_softhsm(user_project, monkeypatch)
    user_project.makepyfile(test_user=USES_HSM)
    result = user_project.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert _message("softhsm_token", "softhsm2-util (package softhsm2) is not on PATH") in out
    assert "During handling" not in out


def test_missing_softhsm_skips_with_the_same_message_when_the_ini_allows_it(
    user_project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_softhsm(user_project, monkeypatch)
    user_project.makeini("[pytest]\nhsmkeys_require_softhsm = false\n")
    user_project.makepyfile(test_user=USES_HSM)
    result = user_project.runpytest_subprocess("-p", "no:cacheprovider", "-rs", timeout=120)
    result.assert_outcomes(skipped=1)
    summary = next(line for line in result.stdout.lines if line.startswith("SKIPPED"))
    assert summary.endswith(_message("softhsm_token", "softhsm2-util (package softhsm2) is not on PATH"))


def test_the_pytest_extra_installs_what_the_fixtures_import() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extra = {req.split("[")[0].split(">")[0].split("=")[0].strip() for req in project["optional-dependencies"]["pytest"]}
    assert {"pytest", "boto3"} <= extra
    assert "hsmkeys.testing.plugin" in project["entry-points"]["pytest11"].values()
