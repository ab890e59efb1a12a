"""The runner's parts, in process: maintenance election, settings checks, ephemeral setup."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from hsmkeys.config import HsmSettings, PrincipalSettings, Settings
from hsmkeys.errors import ConfigError, KMSInternalException
from hsmkeys.models import MaintenanceReport
from hsmkeys.server import runner


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


async def _run_loop_for(store: FakeStore, lock: runner._MaintenanceLock, seconds: float) -> None:
    task = asyncio.create_task(runner._maintenance_loop(store, 0.01, lock))  # type: ignore[arg-type]
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


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
