"""What the audit tests share: an in-process MAC and the catalog's checkpoint table in memory."""

from __future__ import annotations

import hashlib
import hmac

from hsmkeys.catalog.base import AuditCheckpoint

KEY = b"k" * 32
SLOW = 3600.0  # checkpoint_seconds that never elapses within a test


def hmac_sha256(data: bytes) -> bytes:
    """The MAC the tests give the audit log (the HSM's HMAC-SHA256 stands in)."""
    return hmac.new(KEY, data, hashlib.sha256).digest()


class MemoryCheckpoints:
    """The catalog's checkpoint table, in memory."""

    def __init__(self) -> None:
        self.stored: dict[str, AuditCheckpoint] = {}

    def get_audit_checkpoint(self, log_id: str) -> AuditCheckpoint | None:
        return self.stored.get(log_id)

    def put_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
        self.stored[checkpoint.log_id] = checkpoint
