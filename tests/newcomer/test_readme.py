"""The README's copy-paste parts stay true: the operations table is regenerated and
compared, and the set-up commands work from any directory in any POSIX shell."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hsmkeys.operations import OPERATIONS
from hsmkeys.optable import (
    BEGIN_MARKER,
    END_MARKER,
    NOT_SERVED_BECAUSE,
    operations_table,
    readme_table,
)
from hsmkeys.server.wire import KmsWire

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_operations_table_is_the_generated_one() -> None:
    assert readme_table(README) == operations_table(), (
        "README.md's operations table is stale: replace it with the output of `python -m hsmkeys.optable`"
    )


def test_operations_table_has_one_row_per_model_operation_and_serves_the_operation_table() -> None:
    rows = [line.split(" | ") for line in operations_table().splitlines() if line.startswith("| ") and "---" not in line]
    names = {row[0].lstrip("| ") for row in rows[1:]}
    served = {row[0].lstrip("| ") for row in rows[1:] if row[1] == "yes"}
    assert served == set(OPERATIONS)
    assert names == set(KmsWire.load().operations) and len(rows) - 1 == len(names)
    # every unserved operation has a reason written for it, not the fallback
    assert names - served <= set(NOT_SERVED_BECAUSE)
    # and no served operation keeps a stale reason for not being served
    assert not served & set(NOT_SERVED_BECAUSE)


def test_operations_table_says_why_custom_key_stores_and_multi_region_are_not_served() -> None:
    table = operations_table()
    assert "| CreateCustomKeyStore | no | custom key stores" in table
    assert "| ReplicateKey | no | multi-Region" in table
    assert "`Recipient` (Nitro Enclaves attestation)" in table


def test_readme_table_without_markers_is_an_error() -> None:
    with pytest.raises(ValueError):
        readme_table("# no table here\n")
    assert BEGIN_MARKER in README and END_MARKER in README


def _setup_section() -> str:
    start = README.index("## Set-up")
    return README[start : README.index("\n## ", start + 1)]


def test_readme_aws_cli_example_is_portable_and_round_trips() -> None:
    setup = _setup_section()
    assert "<(" not in setup  # bash-only process substitution
    assert "AWS_SHARED_CREDENTIALS_FILE=var/" not in setup  # relative: breaks after a cd
    assert re.search(r"AWS_SHARED_CREDENTIALS_FILE=/\S+/var/credentials", setup)
    assert "fileb:///tmp/p.txt" in setup and "aws kms decrypt" in setup
    assert "--query Plaintext --output text | base64 -d" in setup


def test_make_run_prints_absolute_credentials_and_the_round_trip() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    run = makefile[makefile.index("\nrun:") : makefile.index("\nlint:")]
    assert "AWS_SHARED_CREDENTIALS_FILE=$(CURDIR)/var/credentials" in run
    assert "AWS_SHARED_CREDENTIALS_FILE=var/" not in run
    assert "aws kms decrypt" in run and "fileb:///tmp/p.txt" in run


def test_make_run_installs_only_runtime_dependencies() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    runtime = makefile[makefile.index("$(STAMP): pyproject.toml") : makefile.index("$(TEST_STAMP): $(STAMP)")]
    assert "pip install --progress-bar off -e .\n" in runtime and "[test]" not in runtime
    assert re.search(r"^lint: install-test$", makefile, re.M) and re.search(r"^init: install$", makefile, re.M)
