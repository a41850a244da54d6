"""The wheel and sdist build, install into a fresh venv, and work there."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SMOKE = textwrap.dedent(
    """
    import logging, selfreport
    from selfreport.testing import FakeCollector
    with FakeCollector() as collector:
        selfreport.init(collector.dsn)
        logging.getLogger("installed").error("from an installed package")
        assert collector.wait_for(1), "no event arrived"
        selfreport.close()
        assert collector.events[0]["logentry"]["message"] == "from an installed package"
    print("ok", selfreport.__version__)
    """
)


def _run(*args: object, cwd: Path = ROOT) -> str:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=300, check=False
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_wheel_and_sdist_install_and_run_in_a_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT)
    (wheel,) = dist.glob("selfreport-*.whl")
    (sdist,) = dist.glob("selfreport-*.tar.gz")

    names = zipfile.ZipFile(wheel).namelist()
    assert "selfreport/py.typed" in names
    assert "selfreport/collector/templates/base.html" in names or any(
        n.startswith("selfreport/collector/templates/") for n in names
    )
    assert not [n for n in names if n.startswith("tests/")]
    # What the classifiers and license say reaches the metadata (hatchling < 1.27 wrote no
    # License-Expression for this pyproject.toml)
    metadata = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        .decode()
    )
    assert "License-Expression: MIT" in metadata.splitlines()
    assert "Requires-Python: >=3.9" in metadata.splitlines()
    claimed = {
        line.rsplit(" :: ", 1)[1]
        for line in metadata.splitlines()
        if line.startswith("Classifier: Programming Language :: Python :: 3.")
    }
    assert claimed == {"3.9", "3.10", "3.11", "3.12", "3.13"}
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
    assert any(m.endswith("/tests/e2e/test_packaging.py") for m in members)
    assert any(m.endswith("/CHANGELOG.md") for m in members)

    for artifact in (wheel, sdist):
        venv = tmp_path / f"venv-{artifact.suffix.strip('.')}"
        _run(sys.executable, "-m", "venv", venv)
        python = venv / "bin" / "python"
        _run(python, "-m", "pip", "install", "--quiet", artifact, cwd=tmp_path)
        assert _run(python, "-c", SMOKE, cwd=tmp_path).startswith("ok 0.")
        version = _run(venv / "bin" / "selfreport", "--version", cwd=tmp_path)
        assert version.startswith("selfreport 0.")
