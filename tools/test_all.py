"""Run the test suite on every supported CPython this machine has, each in its own venv."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
PROBE = "import sys; print('%d.%d.%d' % sys.version_info[:3], sys.implementation.name)"


class Outcome(NamedTuple):
    version: str
    full_version: str
    ran: int
    passed: int
    failed: int
    skipped: int
    seconds: float
    problem: str  # empty when the run itself went through

    @property
    def ok(self) -> bool:
        return not self.problem and self.failed == 0 and self.ran > 0

    def line(self) -> str:
        what = f"{self.ran} ran, {self.passed} passed, {self.failed} failed, {self.skipped} skipped"
        status = "ok" if self.ok else "FAILED"
        extra = f" ({self.problem})" if self.problem else ""
        took = f"{self.seconds / 60:.1f} min"
        return f"Python {self.full_version:<8} {status:<6} {what} in {took}{extra}"


def supported_versions() -> list[str]:
    """The ``Programming Language :: Python :: 3.X`` classifiers: what the package claims."""
    found = re.findall(r'"Programming Language :: Python :: (3\.\d+)"', PYPROJECT.read_text())
    return sorted(set(found), key=lambda v: tuple(int(p) for p in v.split(".")))


def _patch_key(path: Path) -> tuple[int, ...]:
    # pyenv's versions/3.12.1 before versions/3.12.0; 3.13.0t or 3.12-dev after every release
    match = re.fullmatch(r"\d+\.\d+\.(\d+)", path.parents[1].name)
    return (1, int(match.group(1))) if match else (0, 0)


def _probe(python: str) -> Optional[str]:
    """The X.Y.Z of a working CPython at ``python``, or None (pyenv shims of absent ones fail)."""
    try:
        out = subprocess.run(
            [python, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if len(out) == 2 and out[1] == "cpython" else None


def find_python(version: str) -> Optional[tuple[str, str]]:
    """(path, X.Y.Z) of a CPython ``version``: pyenv's newest patch release, else on PATH."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    candidates = [
        str(p)
        for p in sorted(
            pyenv_root.glob(f"versions/{version}.*/bin/python{version}"), key=_patch_key
        )[::-1]
    ]
    on_path = shutil.which(f"python{version}")
    if on_path:
        candidates.append(on_path)
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        candidates.append(sys.executable)
    for python in candidates:
        full = _probe(python)
        if full is not None and full.rsplit(".", 1)[0] == version:
            return python, full
    return None


def _run_logged(args: list[str], log: Path) -> bool:
    with log.open("a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        return subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode == 0


def ensure_venv(version: str, python: str, log: Path) -> Path:
    """``.venv-X.Y`` with ``.[dev]`` installed; remade when pyproject.toml or Python changed."""
    venv = ROOT / f".venv-{version}"
    stamp = venv / ".installed"
    want = f"{python}\n{hashlib.sha256(PYPROJECT.read_bytes()).hexdigest()}\n"
    if stamp.is_file() and stamp.read_text() == want and (venv / "bin" / "python").exists():
        return venv
    print(f"installing '.[dev]' into {venv.name}", flush=True)
    started = time.monotonic()
    shutil.rmtree(venv, ignore_errors=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    ok = (
        _run_logged([python, "-m", "venv", str(venv)], log)
        and _run_logged([*pip, "--upgrade", "pip"], log)
        and _run_logged([*pip, "-e", ".[dev]"], log)
    )
    if not ok:
        raise RuntimeError(f"installing into {venv.name} failed: see {log}")
    stamp.write_text(want)
    print(f"installed into {venv.name} in {time.monotonic() - started:.0f} s", flush=True)
    return venv


def _counts(junit: Path) -> tuple[int, int, int, int]:
    """(tests, failed, errors, skipped) from pytest's JUnit XML report."""
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = [0, 0, 0, 0]
    for suite in suites:
        for i, key in enumerate(("tests", "failures", "errors", "skipped")):
            totals[i] += int(suite.get(key, 0))
    return totals[0], totals[1], totals[2], totals[3]


def run_suite(
    version: str, full: str, venv: Path, pytest_args: list[str], work: Path, parallel: bool
) -> Outcome:
    junit = work / f"junit-{version}.xml"
    started = time.monotonic()
    # -rfEs: failures, errors and why each skip skipped (Relay on 3.9, version-gated tests)
    command = [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-rfEs", f"--junitxml={junit}"]
    if parallel:  # interleaved dots say nothing: keep each run's output, show it once done
        log = work / f"pytest-{version}.log"
        with log.open("w") as out:
            code = subprocess.run(
                [*command, *pytest_args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            ).returncode
        print(f"=== pytest on Python {full}\n{log.read_text()}", end="", flush=True)
    else:
        print(f"=== pytest on Python {full}", flush=True)
        code = subprocess.run([*command, *pytest_args], cwd=ROOT).returncode
    seconds = time.monotonic() - started
    if not junit.is_file():
        return Outcome(version, full, 0, 0, 0, 0, seconds, f"pytest exited {code}, no report")
    tests, failures, errors, skipped = _counts(junit)
    ran = tests - skipped
    problem = "" if code in (0, 1) else f"pytest exited {code}"
    return Outcome(
        version, full, ran, ran - failures - errors, failures + errors, skipped, seconds, problem
    )


def typecheck(version: str, venv: Path, log: Path) -> bool:
    """mypy --strict for the lowest supported version, with the mypy that runs there."""
    cache = venv / ".mypy_cache"
    args = [str(venv / "bin" / "mypy"), "--strict", "--python-version", version]
    ok = _run_logged([*args, "--cache-dir", str(cache), "src"], log)
    print(f"mypy --strict --python-version {version} src: {'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        print(log.read_text()[-3000:], flush=True)
    return ok


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Arguments after -- go to pytest, e.g. -- -x -k transport.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="X.Y",
        help="a version not to run (repeatable), e.g. one `make test` already ran",
    )
    parser.add_argument(
        "--require-all",
        action="store_true",
        help="fail when a supported version is not found (CI)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="versions whose suites run at once (installs always run side by side)",
    )
    parser.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    versions = supported_versions()
    unknown = sorted(set(args.skip) - set(versions))
    if unknown:
        print(f"test-all: --skip {', '.join(unknown)}: not a supported version", file=sys.stderr)
        return 2
    found = {v: find_python(v) for v in versions}
    missing = [v for v in versions if found[v] is None]
    print(f"supported (from the classifiers): {', '.join(versions)}")
    print("found: " + (", ".join(f"{v} at {p[0]}" for v, p in found.items() if p) or "none"))
    print(f"not found: {', '.join(missing) or 'none'}")
    if args.skip:
        print(f"skipped on request: {', '.join(args.skip)}")
    print(flush=True)

    started = time.monotonic()
    todo = {v: p for v, p in found.items() if p is not None and v not in args.skip}
    outcomes: dict[str, Outcome] = {}
    typed = True
    with tempfile.TemporaryDirectory(prefix="selfreport-test-all-") as tmp:
        work = Path(tmp)

        def install(version: str) -> Optional[Path]:
            python, full = todo[version]
            log = work / f"install-{version}.log"
            try:
                return ensure_venv(version, python, log)
            except RuntimeError as exc:
                print(log.read_text()[-3000:], flush=True)
                outcomes[version] = Outcome(version, full, 0, 0, 0, 0, 0.0, str(exc))
                return None

        with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
            venvs = dict(zip(todo, pool.map(install, todo)))
        if versions[0] in todo and venvs[versions[0]] is not None:
            typed = typecheck(versions[0], venvs[versions[0]], work / "mypy.log")
        else:
            print(f"mypy --python-version {versions[0]} not run: no venv for it", flush=True)

        def suite(version: str) -> None:
            venv = venvs[version]
            if venv is not None:
                outcome = run_suite(
                    version, todo[version][1], venv, args.pytest_args, work, args.jobs > 1
                )
                outcomes[version] = outcome
                print(outcome.line(), flush=True)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(suite, todo))

    print("\n=== test-all summary")
    for version in sorted(outcomes, key=versions.index):
        print(outcomes[version].line())
    for version in missing:
        hint = f"pyenv install {version}, or put python{version} on PATH"
        print(f"Python {version:<8} not found ({hint})")
    done = [outcomes[v] for v in sorted(outcomes, key=versions.index)]
    passed = sum(o.passed for o in done)
    failed = sum(o.failed for o in done)
    skipped = sum(o.skipped for o in done)
    ran_on = ", ".join(o.version for o in done if o.ran) or "no version"
    print(f"ran on: {ran_on}, in {(time.monotonic() - started) / 60:.1f} min with installs")
    if not typed:
        print("mypy for the lowest version FAILED")
    print(f"test-all: {passed} passed, {failed} failed, {skipped} skipped")
    if not done or not all(o.ok for o in done) or not typed:
        return 1
    if args.require_all and missing:
        print(f"test-all: --require-all and {', '.join(missing)} not found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
