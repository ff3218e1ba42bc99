"""POST /v1/events: append interactions to users' histories."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Body, HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from app.deps import EngineDep, MetricsDep, SettingsDep, StoreDep, history_cap
from app.engine import Engine
from app.schemas import EventIn, EventsResponse
from app.store import Event, Store, StoreUnavailable, group_by_user

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/events", tags=["events"])

_EVENTS = TypeAdapter(list[EventIn])
_EVENT_SCHEMA = EventIn.model_json_schema()
_BODY_SCHEMA = {"anyOf": [_EVENT_SCHEMA, {"type": "array", "items": _EVENT_SCHEMA}]}


def _parse(body: Any, max_events: int) -> list[EventIn]:
    """One event object or a list of them. Validated here rather than by a `EventIn | list[EventIn]`
    annotation, whose errors would name both union branches for every mistake."""
    single = isinstance(body, dict)
    if single:
        body = [body]
    elif not isinstance(body, list):
        raise HTTPException(422, "expected an event object or a list of event objects")
    if not body:
        raise HTTPException(422, "the event list is empty")
    if len(body) > max_events:
        raise HTTPException(422, f"at most {max_events} events per request, got {len(body)}")
    try:
        return _EVENTS.validate_python(body)
    except ValidationError as e:
        errors = []
        for err in e.errors(include_url=False):
            index, *field = err["loc"]  # a single object is reported without the list index
            errors.append({**err, "loc": ("body", *field) if single else ("body", index, *field)})
        raise RequestValidationError(errors) from None


@router.post("", response_model=EventsResponse, openapi_extra={
    "requestBody": {"required": True, "content": {"application/json": {"schema": _BODY_SCHEMA}}}})
async def post_events(body: Annotated[Any, Body()], store: StoreDep, settings: SettingsDep,
                      engine: EngineDep, metrics: MetricsDep) -> EventsResponse:
    """Append events; re-posting a stored event counts it as a duplicate. Omitted timestamps get the
    server's clock. Each new event of a known item also becomes a memory-bank entry (its user's
    sequence up to it, then it), searchable when this returns and kept until the next rebuild,
    which re-encodes it from the stored history."""
    now = time.time()
    events = [Event(e.user_id, e.item_id, now if e.timestamp is None else e.timestamp)
              for e in _parse(body, settings.max_events)]
    result = await store.append_events(events, history_cap(settings, engine))
    if result.accepted and engine.index is not None and engine.index.serving is not None:
        try:
            added = await _add_to_bank(engine, store, events)
            metrics.live_entries.inc(added)
        except StoreUnavailable:
            raise
        except Exception:  # the events are stored; the bank catches up at the next rebuild
            logger.exception("events stored but not added to the live bank")
    return EventsResponse(accepted=result.accepted, duplicates=result.duplicates)


async def _add_to_bank(engine: Engine, store: Store, events: list[Event]) -> int:
    """Bank entries for the posted events: per user, the merged sequence (training-data history,
    then stored events, unknown items dropped) and the positions the events now hold in it."""
    manager = engine.index
    assert manager is not None
    added = 0
    for user, user_events in group_by_user(events).items():
        stored = await store.history(user)
        base = engine.histories.get(user)
        ids, _ = engine.sequence_ids(user, [item for item, _ in stored])
        known = engine.vocab.ids([item for item, _ in stored]) > 0
        offset = 0 if base is None else len(base)
        position = offset + np.cumsum(known) - 1  # position of stored event j when known[j]
        wanted = {(e.item_id, float(e.timestamp)) for e in user_events}
        new = [j for j, event in enumerate(stored) if known[j] and event in wanted]
        if new:
            added += await asyncio.to_thread(manager.add_live, user, ids, position[new], [stored[j] for j in new])
    return added
