"""Tests for the reporting-path mark on selfreport's own log lines."""

from __future__ import annotations

from selfreport._onprem.logformat import MARK_KEY, MARK_TOKEN, is_marked_json, is_marked_text


def test_a_json_line_is_marked_only_by_a_true_mark() -> None:
    assert is_marked_json({MARK_KEY: True, "message": "POST /api/1/envelope/ 200"})
    assert not is_marked_json({MARK_KEY: "true", "message": "a stranger's lookalike"})
    assert not is_marked_json({"message": "an application's line"})


def test_a_text_line_is_marked_by_the_token_anywhere() -> None:
    assert is_marked_text(f"2026-12-02T10:00:00Z INFO selfreport.collector stored {MARK_TOKEN}")
    assert not is_marked_text("2026-12-02T10:00:00Z ERROR app failed reporting_path=0")
