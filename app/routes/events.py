"""POST /v1/events: append interactions to users' histories."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from app.deps import EngineDep, SettingsDep, StoreDep, history_cap
from app.schemas import EventIn, EventsResponse
from app.store import Event

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
                      engine: EngineDep) -> EventsResponse:
    """Append events; re-posting a stored event counts it as a duplicate. Omitted timestamps get the
    server's clock."""
    now = time.time()
    events = [Event(e.user_id, e.item_id, now if e.timestamp is None else e.timestamp)
              for e in _parse(body, settings.max_events)]
    result = await store.append_events(events, history_cap(settings, engine))
    return EventsResponse(accepted=result.accepted, duplicates=result.duplicates)
