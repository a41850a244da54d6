"""The Celery app of the cross-process recursion test: an alerting before_send enqueues a task
that fails, in a real worker (``celery -A celery_loop_app worker``) with a real Redis broker.

Environment: SELFREPORT_DSN (the collector), SELFREPORT_TEST_BROKER (a redis:// URL),
SELFREPORT_TEST_MARK ("0": strip the reporting-path mark from every task published, which is
what an SDK without it, sentry-sdk's Celery integration say, does), SELFREPORT_TEST_LOOP_LIMIT
(the alert task stops failing at that many runs, so a loop ends).
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery, signals

import selfreport
from selfreport.integrations import celery as selfreport_celery

BROKER = os.environ["SELFREPORT_TEST_BROKER"]
LOOP_LIMIT = int(os.environ.get("SELFREPORT_TEST_LOOP_LIMIT", "6"))

app = Celery("selfreport_loop", broker=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
)
store = redis.Redis.from_url(BROKER)


def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    """The alert hook: one alert task per event reported."""
    alert.delay(event["event_id"])
    store.incr("alerts_enqueued")
    return event


# No dedupe and no rate limit: the mark alone must stop the loop (dedupe would fold the
# alert's repeated failures into one event and hide a loop after its second turn).
selfreport.init(before_send=before_send, dedupe_window=0, rate_limit=0)
selfreport_celery.install()


@signals.before_task_publish.connect
def _strip_mark(headers: Any = None, **_: Any) -> None:
    if os.environ.get("SELFREPORT_TEST_MARK", "1") == "0" and isinstance(headers, dict):
        headers.pop(selfreport_celery.MARK_HEADER, None)


@app.task
def original() -> None:
    raise ValueError("the original error")


@app.task
def alert(event_id: str) -> None:
    runs = store.incr("alerts_run")
    if runs < LOOP_LIMIT:
        raise RuntimeError(f"alerting about {event_id} failed")


@app.task
def settle() -> dict[str, int]:
    """Deliver what this worker queued (so every before_send has run), then its counters."""
    selfreport.flush(10.0)
    stats = selfreport.stats()
    store.hset("stats", mapping=stats)
    return stats
