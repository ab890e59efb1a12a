"""Key and alias ARNs: ``arn:aws:kms:<region>:<account>:key/<uuid>`` and ``...:alias/<name>``."""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ArnScope:
    region: str
    account_id: str

    @property
    def prefix(self) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:"

    def key_arn(self, key_uuid: uuid.UUID) -> str:
        return f"{self.prefix}key/{key_uuid}"

    def alias_arn(self, alias_name: str) -> str:
        return f"{self.prefix}{alias_name}"

    def resource(self, arn: str) -> str | None:
        """The ``key/<id>`` or ``alias/<name>`` part of an ARN in this scope, else None."""
        return arn[len(self.prefix) :] if arn.startswith(self.prefix) else None


@functools.lru_cache(maxsize=8192)  # on every request's path; ids repeat
def parse_uuid(text: str) -> uuid.UUID | None:
    """The key UUID in canonical form, or None (KMS key ids are lowercase, hyphenated)."""
    if len(text) != 36:
        return None
    try:
        value = uuid.UUID(text)
    except ValueError:
        return None
    return value if str(value) == text else None
