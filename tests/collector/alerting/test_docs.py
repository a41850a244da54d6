"""docs/alerts.md stays true: its TOML examples load, its signature check accepts our requests."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from tests.collector.alerting.receivers import http_receiver

from selfreport.collector.alerting.config import parse_config
from selfreport.collector.alerting.notifiers import WebhookNotifier, make_test_notification, sign

DOC = (Path(__file__).resolve().parents[3] / "docs" / "alerts.md").read_text(encoding="utf-8")
ENV = {
    "OPS_HOOK_SECRET": "s",
    "PAGERDUTY_ROUTING_KEY": "k",
    "SMTP_PASSWORD": "p",
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, flags=re.DOTALL)


def test_every_toml_example_is_a_valid_configuration() -> None:
    examples = blocks("toml")
    assert len(examples) == 5
    for example in examples:
        parse_config(example, "alerts.md", ENV)


def test_the_signature_check_accepts_a_real_request_and_refuses_a_changed_one() -> None:
    (snippet,) = blocks("python")
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)
    verify = namespace["verify"]
    with http_receiver() as receiver:
        WebhookNotifier("ops", receiver.url, secret="s3cret").send(make_test_notification("ops"), 5)
        (request,) = receiver.requests
    signature = request.headers["X-Selfreport-Signature"]
    assert verify("s3cret", request.body, signature)["state"] == "test"
    with pytest.raises(ValueError, match="bad signature"):
        verify("s3cret", request.body.replace(b"test", b"tost"), signature)
    old = json.dumps({**request.json(), "created": time.time() - 3600}).encode()
    with pytest.raises(ValueError, match="too old"):
        verify("s3cret", old, sign("s3cret", old))
