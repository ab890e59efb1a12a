"""TagResource, UntagResource, ListResourceTags."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from hsmkeys.errors import TagException, ValidationException
from hsmkeys.models import ListResourceTagsResult, Tag
from hsmkeys.ops.common import MAX_TAGS, page_limit, tag_map
from hsmkeys.validation import check_str

if TYPE_CHECKING:
    from hsmkeys.call import Call
    from hsmkeys.keystore import KeyStore


def tag_resource(ks: KeyStore, call: Call, *, key_id: str, tags: Sequence[Tag | Mapping[str, str]]) -> None:
    new = tag_map(tags)
    with ks._catalog.transaction():
        key = ks._key(call, key_id, alias_ok=False)
        ks._require_not_pending_deletion(key)
        merged = ks._catalog.get_tags(key.key_uuid) | new
        if len(merged) > MAX_TAGS:
            raise TagException(f"A key may have at most {MAX_TAGS} tags.")
        ks._catalog.put_tags(key.key_uuid, new)
    call.used(ks._arn(key.key_uuid), None)


def untag_resource(ks: KeyStore, call: Call, *, key_id: str, tag_keys: Sequence[str]) -> None:
    if isinstance(tag_keys, str) or not isinstance(tag_keys, Sequence):
        raise ValidationException("tagKeys must be a list of strings")
    for tag_key in tag_keys:
        check_str("tagKeys", tag_key, min_len=1, max_len=128)
    with ks._catalog.transaction():
        key = ks._key(call, key_id, alias_ok=False)
        ks._require_not_pending_deletion(key)
        ks._catalog.delete_tags(key.key_uuid, tag_keys)
    call.used(ks._arn(key.key_uuid), None)


def list_resource_tags(
    ks: KeyStore, call: Call, *, key_id: str, limit: int | None = None, marker: str | None = None
) -> ListResourceTagsResult:
    size = page_limit(limit, default=50, high=50)
    key = ks._key(call, key_id, alias_ok=False)
    items = sorted(ks._catalog.get_tags(key.key_uuid).items())
    if marker is not None:
        check_str("marker", marker, min_len=1, max_len=1024)
        items = [kv for kv in items if kv[0] > marker]
    page, truncated = items[:size], len(items) > size
    call.used(ks._arn(key.key_uuid), None)
    return ListResourceTagsResult(tuple(Tag(k, v) for k, v in page), truncated, page[-1][0] if truncated else None)
