"""Segment HTTP Tracking API messages: validation, clock-skew correction, identifiers.

This runs on the event loop for every request, so it is plain Python over dicts (no model
objects per message) and produces column lists that the writer turns into one Arrow table
for the whole group commit.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from cdp.identifiers import (
    ANONYMOUS_ID,
    DEVICE_ID,
    EMAIL,
    PHONE,
    USER_ID,
    composite_value,
    normalise,
)

MESSAGE_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
MAX_MESSAGE_BYTES = 32 * 1024
MAX_BATCH_MESSAGES = 2500

JsonDict = dict[str, Any]  # Any: JSON values


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What the hot path needs to know about an `http` source."""

    id: str
    enabled: bool
    # (kind, path) of identifiers the mapping declares,
    # e.g. ("loyalty_card", ("properties", "card")).
    paths: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # (kind, paths of the parts) of composite keys.
    composites: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = ()


class MalformedMessage(ValueError):
    """A message that cannot be stored; its text is the reason reported to the client."""


@dataclass(slots=True)
class Parsed:
    """The accepted messages of one request, column-wise, and its rejections."""

    message_id: list[str] = field(default_factory=list)
    type: list[str] = field(default_factory=list)
    event: list[str | None] = field(default_factory=list)
    user_id: list[str | None] = field(default_factory=list)
    anonymous_id: list[str | None] = field(default_factory=list)
    timestamp: list[datetime] = field(default_factory=list)
    properties: list[str | None] = field(default_factory=list)
    traits: list[str | None] = field(default_factory=list)
    context: list[str | None] = field(default_factory=list)
    sent_at: list[datetime | None] = field(default_factory=list)
    original_timestamp: list[datetime | None] = field(default_factory=list)
    previous_id: list[str | None] = field(default_factory=list)
    group_id: list[str | None] = field(default_factory=list)
    # (index of the accepted message in this request, kind, normalised value)
    identifiers: list[tuple[int, str, str]] = field(default_factory=list)
    # (index in the request, message id, reason)
    rejections: list[tuple[int | None, str | None, str]] = field(default_factory=list)
    dropped: int = 0

    @property
    def accepted(self) -> int:
        """Number of messages accepted for storage."""
        return len(self.message_id)


def write_key_from_header(authorization: str | None) -> str | None:
    """The write key of a `Basic base64(key:)` header, or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    key, _, _ = decoded.partition(":")
    return key or None


def parse_timestamp(value: object) -> datetime:
    """An ISO 8601 timestamp as naive UTC; naive input is read as UTC."""
    if not isinstance(value, str):
        raise MalformedMessage("timestamp must be an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise MalformedMessage(f"bad timestamp {value[:40]!r}") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def _text(value: object, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise MalformedMessage(f"{name} must be a string")


def _dict(value: object, name: str) -> JsonDict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MalformedMessage(f"{name} must be an object")
    return value


def _dump(value: JsonDict | None) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _path(message: Mapping[str, Any], path: tuple[str, ...]) -> object:
    node: object = message
    for part in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def parse_body(raw: bytes) -> JsonDict:
    """The JSON object of a request body."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedMessage("body must be a JSON object")
    return body


def messages_of(body: JsonDict, endpoint: str) -> list[object]:
    """The messages of a request: the `batch` array, or the body itself typed by its route."""
    if endpoint != "batch":
        return [{**body, "type": endpoint}]
    batch = body.get("batch")
    if not isinstance(batch, list):
        raise MalformedMessage("batch must be an array of messages")
    if len(batch) > MAX_BATCH_MESSAGES:
        raise MalformedMessage(f"a batch holds at most {MAX_BATCH_MESSAGES} messages")
    return batch


def parse_messages(
    body: JsonDict,
    messages: list[object],
    *,
    source: SourceInfo,
    received_at: datetime,
    region: str,
    check_sizes: bool,
) -> Parsed:
    """Validate every message; accepted ones become columns, others rejections by index."""
    parsed = Parsed()
    batch_context = body.get("context") if isinstance(body.get("context"), dict) else None
    # The batch's sentAt is parsed once; a bad one rejects the messages that rely on it.
    batch_sent_at: datetime | MalformedMessage | None = None
    if body.get("sentAt") is not None:
        try:
            batch_sent_at = parse_timestamp(body["sentAt"])
        except MalformedMessage as exc:
            batch_sent_at = exc
    for index, message in enumerate(messages):
        message_id: str | None = None
        try:
            if not isinstance(message, dict):
                raise MalformedMessage("a message must be an object")
            message_id = _text(message.get("messageId"), "messageId")
            if check_sizes and len(orjson.dumps(message)) > MAX_MESSAGE_BYTES:
                raise MalformedMessage(f"message over {MAX_MESSAGE_BYTES // 1024} KB")
            _append(
                parsed,
                message,
                message_id,
                batch_context,
                batch_sent_at,
                source,
                received_at,
                region,
            )
        except MalformedMessage as exc:
            parsed.rejections.append((index, message_id, str(exc)))
    return parsed


def _append(
    parsed: Parsed,
    message: JsonDict,
    message_id: str | None,
    batch_context: JsonDict | None,
    batch_sent_at: datetime | MalformedMessage | None,
    source: SourceInfo,
    received_at: datetime,
    region: str,
) -> None:
    kind = message.get("type")
    if kind not in MESSAGE_TYPES:
        raise MalformedMessage(f"unknown type {str(kind)[:40]!r}")
    user_id = _text(message.get("userId"), "userId")
    anonymous_id = _text(message.get("anonymousId"), "anonymousId")
    previous_id = _text(message.get("previousId"), "previousId")
    group_id = _text(message.get("groupId"), "groupId")
    if kind == "alias":
        if previous_id is None or user_id is None:
            raise MalformedMessage("alias needs previousId and userId")
    elif user_id is None and anonymous_id is None:
        raise MalformedMessage("userId or anonymousId is required")
    event: str | None = None
    if kind == "track":
        event = _text(message.get("event"), "event")
        if event is None:
            raise MalformedMessage("track needs an event name")
    elif kind in ("page", "screen"):
        event = _text(message.get("name"), "name")
    elif kind == "group" and group_id is None:
        raise MalformedMessage("group needs a groupId")

    context = _dict(message.get("context"), "context")
    if batch_context:
        context = {**batch_context, **(context or {})}
    context_traits = _dict(context.get("traits"), "context.traits") if context else None
    traits = _dict(message.get("traits"), "traits")
    if kind == "identify" and traits is None:
        traits = context_traits
    properties = _dict(message.get("properties"), "properties")

    original = message.get("timestamp")
    sent_raw = message.get("sentAt")
    if sent_raw:
        sent_at: datetime | None = parse_timestamp(sent_raw)
    elif isinstance(batch_sent_at, MalformedMessage):
        raise batch_sent_at
    else:
        sent_at = batch_sent_at
    original_ts = parse_timestamp(original) if original is not None else None
    if original_ts is None:
        timestamp = received_at
    elif sent_at is not None:
        # Segment's skew correction: the client clock is off by (sentAt - receivedAt).
        timestamp = received_at - (sent_at - original_ts)
    else:
        timestamp = original_ts

    row = len(parsed.message_id)
    found: list[tuple[str, object]] = [
        (USER_ID, user_id),
        (ANONYMOUS_ID, anonymous_id),
    ]
    if kind == "alias":
        # previousId is most often the anonymous id the user had before identifying.
        found.append((ANONYMOUS_ID, previous_id))
    person_traits = traits if kind != "group" else None
    for source_traits in (person_traits, context_traits):
        if source_traits:
            found.append((EMAIL, source_traits.get("email")))
            found.append((PHONE, source_traits.get("phone")))
    if context:
        device = context.get("device")
        if isinstance(device, dict):
            found.append((DEVICE_ID, device.get("id")))
    if source.paths:
        for path_kind, path in source.paths:
            found.append((path_kind, _path(message, path)))
    seen: set[tuple[str, str]] = set()
    for id_kind, raw in found:
        if raw is None or isinstance(raw, dict | list | bool):
            continue
        value = normalise(id_kind, raw, region=region)
        if value is None:
            parsed.dropped += 1
        elif (id_kind, value) not in seen:
            seen.add((id_kind, value))
            parsed.identifiers.append((row, id_kind, value))
    for composite_kind, part_paths in source.composites:
        value = composite_value([_path(message, p) for p in part_paths])
        if value is not None:
            parsed.identifiers.append((row, composite_kind, value))

    parsed.message_id.append(message_id or f"api-{uuid.uuid4()}")
    parsed.type.append(kind)
    parsed.event.append(event)
    parsed.user_id.append(user_id.strip() if user_id else None)
    parsed.anonymous_id.append(anonymous_id.strip() if anonymous_id else None)
    parsed.timestamp.append(timestamp)
    parsed.properties.append(_dump(properties))
    parsed.traits.append(_dump(traits))
    parsed.context.append(_dump(context))
    parsed.sent_at.append(sent_at)
    parsed.original_timestamp.append(original_ts)
    parsed.previous_id.append(previous_id)
    parsed.group_id.append(group_id)


def source_paths(
    identifiers: list[JsonDict],
) -> tuple[
    tuple[tuple[str, tuple[str, ...]], ...], tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]
]:
    """Identifier paths and composite keys of a mapping, in the hot path's form."""
    paths: list[tuple[str, tuple[str, ...]]] = []
    composites: list[tuple[str, tuple[tuple[str, ...], ...]]] = []
    for spec in identifiers:
        if spec.get("composite"):
            parts = tuple(_as_path(p) for p in spec["composite"])
            composites.append((spec["kind"], parts))
        elif spec.get("column"):
            paths.append((spec["kind"], _as_path(spec["column"])))
    return tuple(paths), tuple(composites)


def _as_path(name: str) -> tuple[str, ...]:
    """A dotted path; a bare name is a trait."""
    parts = tuple(name.split("."))
    return parts if len(parts) > 1 else ("traits", name)
