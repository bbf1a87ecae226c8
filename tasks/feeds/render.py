"""What `ampsync feed preview` and `ampsync feed list` print: a plan as text or JSON, and one
line per feed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from ..settings import mask_url
from .config import Feed
from .plan import Plan, shown_key


def render_preview(plan: Plan, limit: int | None = None, diff: bool = False) -> str:
    feed = plan.feed
    shown = plan.planned if limit is None else plan.planned[:limit]
    out = [
        f"feed {feed.name} ({feed.kind}) from {mask_url(feed.source_url)}",
        f"the next run would enqueue {plural(len(plan.planned), 'row')}"
        + (f" and {plural(plan.markers, 'marker event')}" if plan.markers else "")
        + f" from {plural(plan.rows_read, 'row')} read; {len(plan.invalid)} invalid",
    ]
    if plan.settled.get("sent") or plan.settled.get("not_delivered"):
        out.append(
            f"earlier rows since confirmed: {plan.settled.get('sent', 0)} sent, "
            f"{plan.settled.get('not_delivered', 0)} not delivered"
        )
    if plan.note:
        out.append(f"note: {plan.note}")
    for n, p in enumerate(shown, 1):
        out.append("")
        out.append(f"{n}. {shown_key(p.key) if feed.kind != 'event' else p.key}")
        if diff and p.changes:
            for prop, c in p.changes.items():
                old = _fmt(c.old) if c.known else "(never sent)"
                new = "(unset)" if c.new is None else _fmt(c.new)
                out.append(f"   {prop}: {old} → {new}")
        else:
            out.append(f"   queue row: {_json(_shown_row(p.row))}")
            if p.error:
                out.append(f"   invalid, would be enqueued as failed: {p.error}")
            else:
                out.append(f"   payload:   {_json(_shown_payload(p.payload, p.row))}")
            if p.marker_payload:
                out.append(f"   marker:    {_json(_shown_payload(p.marker_payload, p.marker))}")
    if len(shown) < len(plan.planned):
        out.append(f"\n… {len(plan.planned) - len(shown)} more rows (--limit)")
    errors = plan.invalid + [f"{p.key}: {p.error}" for p in plan.planned if p.error]
    if errors:
        out.append("\nvalidation errors:")
        out.extend(f"  {e}" for e in errors)
    return "\n".join(out)


def plan_as_dict(plan: Plan, limit: int | None = None) -> dict:
    shown = plan.planned if limit is None else plan.planned[:limit]
    return {
        "feed": plan.feed.name,
        "kind": plan.feed.kind,
        "rows_read": plan.rows_read,
        "rows": len(plan.planned),
        "markers": plan.markers,
        "note": plan.note,
        "settled": plan.settled,
        "planned": [
            {
                "key": p.key,
                "row": _shown_row(p.row),
                "error": p.error,
                "payload": _shown_payload(p.payload, p.row) if p.payload else None,
                "marker": _shown_payload(p.marker_payload, p.marker) if p.marker_payload else None,
                "diff": {
                    k: {"old": c.old, "new": c.new, "known": c.known} for k, c in p.changes.items()
                },
            }
            for p in shown
        ],
        "errors": plan.invalid + [f"{p.key}: {p.error}" for p in plan.planned if p.error],
    }


ASSIGNED_ON_ENQUEUE = "(assigned when enqueued)"


def _shown_payload(payload: dict | None, row: dict | None) -> dict | None:
    """Fields that derive from the queue row's id and created_at are unknown before insert."""
    if payload is None or row is None:
        return payload
    shown = dict(payload)
    if "insert_id" in shown and not row.get("insert_id"):
        shown["insert_id"] = ASSIGNED_ON_ENQUEUE
    if "time" in shown and not row.get("event_time"):
        shown["time"] = ASSIGNED_ON_ENQUEUE
    return shown


def _shown_row(row: dict) -> dict:
    return {
        k: (v.isoformat() if isinstance(v, datetime) else v)
        for k, v in row.items()
        if v is not None
    }


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _fmt(value: Any) -> str:
    return "(unset)" if value is None else _json(value)


def describe(feed: Feed) -> str:
    what = f"procedure {feed.procedure}" if feed.procedure else "query"
    every = f"every {feed.schedule:g} s" if feed.schedule else "manual (no schedule)"
    return f"{feed.name}: {feed.kind} from {what} on {mask_url(feed.source_url)}, {every}"
