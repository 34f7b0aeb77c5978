"""The wheel ships every module: pyproject.toml lists each package by hand and maps each op's
folder under kernels/ to flashlm.kernels.<op>, so a new sub-package or op that is not added
there would be missing from installs that are not editable."""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _setuptools_version():
    if importlib.util.find_spec("setuptools") is None:
        return None
    import setuptools

    return tuple(int(p) for p in setuptools.__version__.split(".")[:2])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    version = _setuptools_version()
    if version is None or version < (77, 0):
        pytest.skip(f"building the wheel needs setuptools >= 77 in this environment (found {version})")
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what the wheel is made of, so that setuptools' build/ and egg-info
    # folders stay out of the checkout; no build isolation: this environment's setuptools.
    src = out / "src"
    for name in ("flashlm", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-q", "-w", str(out), str(src)], capture_output=True, text=True, cwd=out)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("flashlm-*.whl")
    return path


def _expected_modules():
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "flashlm").rglob("*.py")}
    for op in (ROOT / "kernels").iterdir():
        if op.is_dir() and (op / "__init__.py").is_file():
            expected |= {f"flashlm/kernels/{p.relative_to(ROOT / 'kernels').as_posix()}" for p in op.rglob("*.py")}
    return expected


def test_wheel_holds_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.endswith(".py")}
    missing = sorted(_expected_modules() - shipped)
    assert not missing, f"not in the wheel (add the package to pyproject.toml): {missing}"
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must ship as flashlm.kernels only"


def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        (meta_name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(z.read(meta_name).decode())
        (entry_name,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = z.read(entry_name).decode()
    assert meta["Name"] == "flashlm"
    assert meta["License-Expression"] == "Apache-2.0"
    assert "flashlm = flashlm.cli:main" in entry_points
