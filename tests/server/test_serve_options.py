"""``serve --ephemeral`` options seen from outside: the access log reaches stderr, and the
scope flags reach the key ARNs."""

from __future__ import annotations

import re

import pytest
from server_harness import start_server

pytestmark = pytest.mark.server


def test_access_log_flag_writes_one_line_per_request_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    server = start_server("--access-log", "--region", "ap-south-1", "--account-id", "777788889999")
    try:
        client = server.client()
        arn = client.create_key()["KeyMetadata"]["Arn"]
        client.describe_key(KeyId=arn)
    finally:
        assert server.stop() == 0
    assert re.fullmatch(r"arn:aws:kms:ap-south-1:777788889999:key/[0-9a-f-]{36}", arn)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "event=access " in line]
    caller = "caller=arn:aws:iam::777788889999:user/admin"
    assert [(caller in line, line.split("operation=")[1].split()[0]) for line in lines] == [
        (True, "CreateKey"),
        (True, "DescribeKey"),
    ]
    assert all(" status=200 " in line for line in lines)
