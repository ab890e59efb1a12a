"""Server fixtures: a real hsmkeys server (ephemeral SoftHSM2 token) and boto3 clients.

``kms_server`` is started once per session, ``kms_server_two_workers`` once per module
that uses it; both are stopped with SIGTERM by the fixture and must exit 0. Every
response the ``kms`` client gets is checked against the botocore model; a test fails
if any of its responses departed from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from server_harness import ServerProcess, WireLog, make_client, start_server


@pytest.fixture(scope="session")
def kms_server() -> Iterator[ServerProcess]:
    server = start_server()
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def kms_server_two_workers() -> Iterator[ServerProcess]:
    server = start_server("--workers", "2")
    yield server
    assert server.stop() == 0


_WIRE_LOG_FOR_SUMMARY: WireLog | None = None


@pytest.fixture(scope="session")
def wire_log() -> WireLog:
    global _WIRE_LOG_FOR_SUMMARY
    _WIRE_LOG_FOR_SUMMARY = WireLog()
    return _WIRE_LOG_FOR_SUMMARY


@pytest.fixture(autouse=True)
def _no_wire_shape_errors(wire_log: WireLog) -> Iterator[None]:
    before = len(wire_log.errors)
    yield
    new = wire_log.errors[before:]
    assert not new, "responses departing from the botocore model:\n" + "\n".join(new)


@pytest.fixture(scope="session")
def kms(kms_server: ServerProcess, wire_log: WireLog) -> Any:
    return make_client(kms_server, wire_log)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Name the operations whose responses were checked against the model."""
    log = _WIRE_LOG_FOR_SUMMARY
    if log is not None and log.checked:
        terminalreporter.write_line(
            f"wire shapes checked for {len(log.checked)} operations: {', '.join(sorted(log.checked))}"
        )
