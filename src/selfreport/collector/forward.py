"""Forwarding what the collector stores upstream, through a scrubbing, spooling Destination."""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from selfreport._destination import Destination
from selfreport.exceptions import ConfigError

from .ingest import StoredEnvelope

__all__ = ["FORWARD_MODES", "Forwarder"]

FORWARD_MODES = ("all", "own")


class Forwarder:
    """An ``on_stored`` hook sending newly stored events on to an upstream.

    ``mode="all"`` forwards every project's events, ``"own"`` only the collector's own
    self-reports (its internal project). Only events stored for the first time go on, so a
    collector forwarding into itself, or a replayed duplicate, cannot loop. Forwarding never
    blocks ingestion: the destination queues, scrubs, rate limits and spools on its own thread.
    """

    def __init__(
        self,
        upstream: Union[str, Destination],
        *,
        mode: str = "all",
        scrub: bool = False,
        spool_dir: Optional[str] = None,
        **options: Any,
    ) -> None:
        if mode not in FORWARD_MODES:
            raise ConfigError("forward", f"must be one of {', '.join(FORWARD_MODES)}, not {mode!r}")
        self.mode = mode
        if isinstance(upstream, Destination):
            self.destination = upstream
        else:
            self.destination = Destination(
                upstream, name="upstream", scrub=scrub, spool_dir=spool_dir, **options
            )

    def __call__(self, stored: StoredEnvelope) -> None:
        if self.mode == "own" and not (stored.own_report or stored.project.internal):
            return
        for event, is_new in zip(stored.events, stored.stored):
            if is_new:
                self.destination.send_event(json.loads(event.payload))

    def stats(self) -> dict[str, int]:
        return self.destination.stats()

    def close(self, timeout: float = 2.0) -> None:
        self.destination.close(timeout)
