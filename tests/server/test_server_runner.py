"""The runner's parts, in process: maintenance election, settings checks, ephemeral setup,
and the startup refusals (checked by stopping the runner where it would bind)."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from hsmkeys.authz import compile_policy
from hsmkeys.config import HsmSettings, PrincipalSettings, ServerSettings, Settings
from hsmkeys.errors import ConfigError, KMSInternalException
from hsmkeys.models import MaintenanceReport
from hsmkeys.server import runner
from hsmkeys.server.slowlane import SlowLane
from hsmkeys.server.tls import write_self_signed_cert


def _settings(tmp_path: Path, *principals: PrincipalSettings) -> Settings:
    return Settings(
        hsm=HsmSettings(module="/nonexistent.so", token_label="t", pin_env="NO_SUCH_PIN"),
        catalog=tmp_path / "catalog.sqlite3",
        principals=principals,
    )


class FakeStore:
    def __init__(self, fail: bool = False) -> None:
        self.runs = 0
        self.fail = fail

    def run_maintenance(self) -> MaintenanceReport:
        self.runs += 1
        if self.fail:
            raise KMSInternalException("boom")
        return MaintenanceReport((), ())

    def hold_maintenance_lease(self, holder: str, seconds: float) -> bool:
        return True  # the catalog's lease is tested in tests/multihost

    def release_maintenance_lease(self, holder: str) -> None:
        pass

    def use_own_hsm_session(self) -> bool:
        self.lane_threads = getattr(self, "lane_threads", 0) + 1
        return True


async def _run_loop_for(store: FakeStore, lock: runner._MaintenanceLock, seconds: float) -> None:
    leader = runner._MaintenanceLeader(store, lock, 30.0)  # type: ignore[arg-type]
    lane = SlowLane(store)
    task = asyncio.create_task(runner._maintenance_loop(store, 0.01, leader, lane))  # type: ignore[arg-type]
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    lane.close()
    if store.runs:  # maintenance ran in the slow lane's thread, which has its own HSM session
        assert store.lane_threads == 1


def test_only_one_maintenance_lock_holder(tmp_path: Path) -> None:
    path = tmp_path / "m.lock"
    first, second = runner._MaintenanceLock(path), runner._MaintenanceLock(path)
    assert first.try_acquire()
    assert not second.try_acquire()
    assert first.try_acquire()  # re-entrant for its holder
    first.release()
    assert second.try_acquire()
    second.release()


def test_maintenance_runs_only_in_the_lock_holder(tmp_path: Path) -> None:
    path = tmp_path / "m.lock"
    holder, other = runner._MaintenanceLock(path), runner._MaintenanceLock(path)
    assert holder.try_acquire()
    waiting = FakeStore()
    asyncio.run(_run_loop_for(waiting, other, 0.1))
    assert waiting.runs == 0
    holder.release()
    running = FakeStore()
    asyncio.run(_run_loop_for(running, other, 0.1))
    assert running.runs >= 2
    other.release()


def test_maintenance_failure_does_not_stop_the_loop(tmp_path: Path) -> None:
    store = FakeStore(fail=True)
    lock = runner._MaintenanceLock(tmp_path / "m.lock")
    asyncio.run(_run_loop_for(store, lock, 0.1))
    assert store.runs >= 2
    lock.release()


def test_maintenance_lock_sits_beside_the_catalog(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert runner.maintenance_lock_path(settings) == tmp_path / "catalog.sqlite3.maintenance.lock"


def test_a_server_without_principals_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no principals"):
        runner.run_server(_settings(tmp_path), port=0)


def test_an_unreadable_principal_secret_is_refused_before_listening(tmp_path: Path) -> None:
    principal = PrincipalSettings(
        arn="arn:aws:iam::111122223333:user/a",
        access_key_id="AKIAAAAAAAAAAAAAAAAA",
        secret_access_key_file=tmp_path / "missing",
    )
    with pytest.raises(ConfigError, match="secret_access_key"):
        runner.run_server(_settings(tmp_path, principal), port=0)


def test_workers_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="workers"):
        runner.run_server(_settings(tmp_path), workers=0)


def test_ephemeral_settings_take_credentials_from_the_environment(tmp_path: Path) -> None:
    env = {"AWS_ACCESS_KEY_ID": "AKIAFROMENVIRONMENT1", "AWS_SECRET_ACCESS_KEY": "s3cret"}
    settings, generated = runner.ephemeral_settings(tmp_path, env=env, account_id="444455556666")
    assert not generated
    (principal,) = settings.principals
    assert principal.arn == "arn:aws:iam::444455556666:user/admin"
    assert principal.access_key_id == "AKIAFROMENVIRONMENT1"
    assert principal.secret_access_key() == "s3cret"
    assert settings.audit_log == tmp_path.resolve() / "audit.log"
    assert settings.catalog.parent == tmp_path.resolve()
    for secret_file in (settings.hsm.pin_file, principal.secret_access_key_file):
        assert secret_file is not None
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert (tmp_path / "softhsm2.conf").is_file()


def test_ephemeral_settings_generate_credentials_when_absent(tmp_path: Path) -> None:
    settings, generated = runner.ephemeral_settings(
        tmp_path, env={"AWS_ACCESS_KEY_ID": "AKIAONLYHALFGIVEN000"}
    )
    assert generated
    (principal,) = settings.principals
    assert principal.access_key_id.startswith("AKIA") and len(principal.access_key_id) == 20
    assert principal.access_key_id != "AKIAONLYHALFGIVEN000"
    assert len(principal.secret_access_key()) >= 40


# --- startup refusals: audit log, plain HTTP off loopback, TLS pair ------------------------


class _Bound(Exception):
    """Raised instead of binding: every startup check before it passed."""


@pytest.fixture
def no_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: object) -> socket.socket:
        raise _Bound

    monkeypatch.setattr(runner._Address, "listen", refuse)


def _servable(tmp_path: Path, *, audit: bool = True, tls: tuple[Path, Path] | None = None) -> Settings:
    secret = tmp_path / "admin.secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    principal = PrincipalSettings(
        arn="arn:aws:iam::111122223333:user/admin",
        access_key_id="test",
        secret_access_key_file=secret,
    )
    settings = _settings(tmp_path, principal)
    server = ServerSettings(tls_cert=tls[0], tls_key=tls[1]) if tls else ServerSettings()
    return replace(settings, audit_log=tmp_path / "audit.log" if audit else None, server=server)


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    write_self_signed_cert(cert, key)
    return cert, key


def test_a_server_without_an_audit_log_is_refused_unless_no_audit(
    tmp_path: Path, no_binding: None
) -> None:
    settings = _servable(tmp_path, audit=False)
    with pytest.raises(ConfigError, match=r"^audit_log: not set.*--no-audit"):
        runner.run_server(settings, port=0)
    with pytest.raises(_Bound):
        runner.run_server(settings, port=0, no_audit=True)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_plain_http_on_a_non_loopback_address_is_refused(tmp_path: Path, no_binding: None, host: str) -> None:
    with pytest.raises(ConfigError, match=r"refusing plain HTTP on .*not a loopback.*--tls-cert.*--insecure-http"):
        runner.run_server(_servable(tmp_path), host=host, port=0)


def test_configured_non_loopback_host_is_refused_too(tmp_path: Path, no_binding: None) -> None:
    settings = _servable(tmp_path)
    settings = replace(settings, server=replace(settings.server, host="0.0.0.0", port=0))
    with pytest.raises(ConfigError, match=r"refusing plain HTTP on 0\.0\.0\.0"):
        runner.run_server(settings)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_insecure_http_allows_plain_http_off_loopback(tmp_path: Path, no_binding: None, host: str) -> None:
    with pytest.raises(_Bound):
        runner.run_server(_servable(tmp_path), host=host, port=0, insecure_http=True)


def test_tls_allows_a_non_loopback_address(
    tmp_path: Path, no_binding: None, tls_pair: tuple[Path, Path]
) -> None:
    with pytest.raises(_Bound):
        runner.run_server(_servable(tmp_path, tls=tls_pair), host="0.0.0.0", port=0)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_plain_http_on_loopback_is_allowed(tmp_path: Path, no_binding: None, host: str) -> None:
    with pytest.raises(_Bound):
        runner.run_server(_servable(tmp_path), host=host, port=0)


def test_a_certificate_and_key_that_do_not_match_are_refused_before_binding(
    tmp_path: Path, no_binding: None, tls_pair: tuple[Path, Path]
) -> None:
    other_cert, other_key = tmp_path / "other" / "cert.pem", tmp_path / "other" / "key.pem"
    write_self_signed_cert(other_cert, other_key)
    with pytest.raises(ConfigError, match="not a matching PEM certificate"):
        runner.run_server(_servable(tmp_path, tls=(tls_pair[0], other_key)), port=0)


def test_a_missing_certificate_is_refused_before_binding(
    tmp_path: Path, no_binding: None, tls_pair: tuple[Path, Path]
) -> None:
    with pytest.raises(ConfigError, match=r"server\.tls_cert: .*missing\.pem does not exist"):
        runner.run_server(_servable(tmp_path, tls=(tmp_path / "missing.pem", tls_pair[1])), port=0)


def test_a_group_readable_principal_secret_is_refused_before_binding(
    tmp_path: Path, no_binding: None
) -> None:
    settings = _servable(tmp_path)
    (tmp_path / "admin.secret").chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        runner.run_server(settings, port=0)


# --- ephemeral scope and credentials ------------------------------------------------------


def test_ephemeral_settings_take_region_and_account_from_hsmkeys_env(tmp_path: Path) -> None:
    env = {"HSMKEYS_REGION": "eu-central-1", "HSMKEYS_ACCOUNT_ID": "444455556666"}
    settings, _ = runner.ephemeral_settings(tmp_path, env=env)
    assert (settings.region, settings.account_id) == ("eu-central-1", "444455556666")
    assert settings.principals[0].arn == "arn:aws:iam::444455556666:user/admin"


def test_ephemeral_region_and_account_arguments_win_over_the_environment(tmp_path: Path) -> None:
    env = {"HSMKEYS_REGION": "eu-central-1", "HSMKEYS_ACCOUNT_ID": "444455556666"}
    settings, _ = runner.ephemeral_settings(tmp_path, env=env, region="ap-south-1", account_id="777788889999")
    assert (settings.region, settings.account_id) == ("ap-south-1", "777788889999")


@pytest.mark.parametrize(
    ("env", "kwargs", "field"),
    [
        ({"HSMKEYS_REGION": "Europe"}, {}, "region"),
        ({}, {"region": "us-east"}, "region"),
        ({"HSMKEYS_ACCOUNT_ID": "1234"}, {}, "account_id"),
        ({}, {"account_id": "12345678901a"}, "account_id"),
        ({"AWS_ACCESS_KEY_ID": "not-valid", "AWS_SECRET_ACCESS_KEY": "s"}, {}, "AWS_ACCESS_KEY_ID"),
        ({"AWS_ACCESS_KEY_ID": "x" * 129, "AWS_SECRET_ACCESS_KEY": "s"}, {}, "AWS_ACCESS_KEY_ID"),
    ],
)
def test_bad_ephemeral_scope_or_access_key_is_refused_before_making_a_token(
    tmp_path: Path, env: dict[str, str], kwargs: dict[str, str], field: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{field}"):
        runner.ephemeral_settings(
            tmp_path, env=env, region=kwargs.get("region"), account_id=kwargs.get("account_id")
        )
    assert not (tmp_path / "softhsm2.conf").exists()


def test_ephemeral_settings_accept_an_emulator_style_access_key(tmp_path: Path) -> None:
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    settings, generated = runner.ephemeral_settings(tmp_path, env=env)
    assert not generated
    assert settings.principals[0].access_key_id == "test"
    assert settings.principals[0].secret_access_key() == "test"


def test_ephemeral_admin_may_do_everything_by_identity_policy(tmp_path: Path) -> None:
    settings, _ = runner.ephemeral_settings(tmp_path, env={})
    (principal,) = settings.principals
    assert principal.policy == runner.EPHEMERAL_ADMIN_POLICY
    compile_policy(principal.policy, kind="identity")
    assert json.loads(principal.policy)["Statement"] == [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]


@pytest.mark.parametrize("no_audit", [False, True])
def test_ephemeral_no_audit_serves_without_an_audit_log(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_audit: bool
) -> None:
    seen: list[tuple[Settings, bool]] = []
    monkeypatch.setattr(runner, "run_server", lambda settings, **kw: seen.append((settings, kw["no_audit"])))
    runner.run_ephemeral(port=0, no_audit=no_audit)
    ((settings, passed),) = seen
    assert passed is no_audit
    assert (settings.audit_log is None) is no_audit
    printed = capsys.readouterr().out
    assert ("audit log: none (--no-audit" in printed) is no_audit
