"""The kill -9 test's collector stand-in: an outbox on a real database and a real webhook."""

from __future__ import annotations

import sys
import time

from selfreport.collector.alerting.model import Notification
from selfreport.collector.alerting.notifiers import WebhookNotifier
from selfreport.collector.alerting.outbox import Outbox
from selfreport.collector.storage import SqliteStorage


def main(path: str, url: str, mode: str) -> None:
    storage = SqliteStorage(path).start()
    outbox = Outbox(storage, {"ops": WebhookNotifier("ops", url, timeout=60.0)})
    if mode in ("put", "put-and-deliver"):
        note = Notification("nid-1", "rate:r:p", "r", "rate", "firing", "t", "x", "p", time.time())
        assert outbox.put(note, ["ops"]) == 1
        print("put", flush=True)
    if mode == "put":
        sys.stdin.read()  # committed, never sent: killed here
        return
    outbox.start()
    while outbox.stats()["delivered"] < 1:  # killed in here when the receiver holds the answer
        time.sleep(0.01)
    print("delivered", flush=True)
    outbox.close()
    storage.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
