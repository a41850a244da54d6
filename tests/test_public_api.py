"""The public API is pinned: names, signatures, documentation, and a dependency-free import."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import selfreport
import selfreport.testing


def test_public_names_are_pinned() -> None:
    assert selfreport.__all__ == [
        "Client",
        "ConfigError",
        "Destination",
        "LoggingHandler",
        "Scrubber",
        "SelfreportError",
        "__version__",
        "add_breadcrumb",
        "capture_exception",
        "capture_message",
        "checkin",
        "close",
        "flush",
        "guarded",
        "init",
        "is_own_report",
        "is_reporting",
        "monitor",
        "new_scope",
        "reporting_path",
        "set_context",
        "set_extra",
        "set_tag",
        "set_tags",
        "set_user",
        "stats",
    ]
    assert selfreport.testing.__all__ == [
        "CapturedEvents",
        "FakeCollector",
        "MemoryTransport",
        "ReceivedRequest",
        "capture_events",
        "selfreport_events",
    ]


@pytest.mark.parametrize("module", [selfreport, selfreport.testing])
def test_every_public_name_exists_and_is_documented(module: object) -> None:
    for name in module.__all__:  # type: ignore[attr-defined]
        value = getattr(module, name)
        if name == "__version__":
            continue
        doc = inspect.getdoc(value)
        assert doc, f"{module.__name__}.{name} has no docstring"  # type: ignore[attr-defined]
    assert inspect.getdoc(module)


@pytest.mark.parametrize(
    "cls",
    [
        selfreport.Client,
        selfreport.LoggingHandler,
        selfreport.testing.FakeCollector,
        selfreport.testing.CapturedEvents,
        selfreport.testing.MemoryTransport,
    ],
)
def test_public_methods_are_documented(cls: type) -> None:
    for name, member in vars(cls).items():
        if name.startswith("_") or not (callable(member) or isinstance(member, property)):
            continue
        assert inspect.getdoc(member), f"{cls.__name__}.{name} has no docstring"


def test_version_matches_the_installed_metadata() -> None:
    assert selfreport.__version__ == importlib.metadata.version("selfreport")


def test_init_signature_is_the_documented_one() -> None:
    parameters = inspect.signature(selfreport.init).parameters
    assert list(parameters)[:10] == [
        "dsn",
        "environment",
        "release",
        "before_send",
        "sample_rate",
        "max_queue",
        "shutdown_timeout",
        "logging_level",
        "install_hooks",
        "debug",
    ]
    defaults = {name: p.default for name, p in parameters.items()}
    assert defaults["dsn"] is None
    assert defaults["sample_rate"] == 1.0
    assert defaults["max_queue"] == 1000
    assert defaults["shutdown_timeout"] == 2.0
    assert defaults["logging_level"] == logging.ERROR
    assert defaults["install_hooks"] is True
    assert defaults["debug"] is False
    assert parameters["options"].kind is inspect.Parameter.VAR_KEYWORD
    assert all(
        p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in parameters.items() if name not in
        ("dsn", "options")
    )  # fmt: skip


def test_init_and_client_agree_on_shared_options() -> None:
    init_defaults = {
        name: p.default
        for name, p in inspect.signature(selfreport.init).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    client_defaults = {
        name: p.default for name, p in inspect.signature(selfreport.Client).parameters.items()
    }
    for name, default in init_defaults.items():
        if name in client_defaults:
            assert client_defaults[name] == default, name


def test_module_functions() -> None:
    signatures = {
        name: str(inspect.signature(getattr(selfreport, name)))
        for name in ("capture_exception", "capture_message", "flush", "close", "stats")
    }
    assert signatures == {
        "capture_exception": "(exc: 'Optional[BaseException]' = None, *, "
        "extra: 'Optional[Mapping[str, Any]]' = None, tags: 'Optional[Mapping[str, Any]]' = None)"
        " -> 'Optional[str]'",
        "capture_message": "(message: 'str', level: 'str' = 'error') -> 'Optional[str]'",
        "flush": "(timeout: 'float' = 2.0) -> 'bool'",
        "close": "(timeout: 'Optional[float]' = None) -> 'None'",
        "stats": "() -> 'dict[str, int]'",
    }


def test_error_hierarchy() -> None:
    assert issubclass(selfreport.ConfigError, ValueError)
    assert issubclass(selfreport.ConfigError, selfreport.SelfreportError)
    assert issubclass(selfreport.SelfreportError, Exception)
    error = selfreport.ConfigError("sample_rate", "must be between 0 and 1")
    assert error.option == "sample_rate"
    assert str(error) == "sample_rate: must be between 0 and 1"


def test_package_is_typed() -> None:
    assert (Path(selfreport.__file__).parent / "py.typed").exists()


def test_importing_selfreport_imports_no_optional_library() -> None:
    optional = ["sentry_sdk", "starlette", "uvicorn", "prometheus_client", "datadog",
                "opentelemetry", "httpx", "structlog", "loguru", "celery", "redis",
                "pytest"]  # fmt: skip
    code = (
        "import json, sys, selfreport, selfreport.logging, selfreport.testing;"
        f"print(json.dumps(sorted(m for m in {optional!r} if m in sys.modules)))"
    )
    # -I: isolated, so no pytest plugin or sitecustomize imports anything on our behalf.
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["pytest"]  # only selfreport.testing's optional fixture
    core = subprocess.run(
        [sys.executable, "-I", "-c", code.replace(", selfreport.testing", "")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(core.stdout) == []


def test_every_public_name_is_in_the_api_reference() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [
        name
        for name in selfreport.__all__
        if f"::: selfreport.{name}\n" not in text and f"`selfreport.{name}`" not in text
    ]
    assert missing == []
