"""The wheel is complete: built from this tree, installed into a fresh virtualenv, it runs.

The wheel is installed with pip, without its dependencies and without an index (no
network); the fresh environment reaches psutil, tqdm and cloudpickle through a .pth
line naming this interpreter's site-packages, appended after its own. forkref itself
must then come from the wheel: every module of src/forkref, py.typed, the version, the
``forkref`` command and ``forkref doctor``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

import forkref

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "forkref"


def _run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done


def _build_wheel(outdir: Path) -> Path:
    if importlib.util.find_spec("build") is None:
        pytest.skip("the 'build' package is not installed (pip install -e '.[test]')")
    # Without isolation where this environment can build (no download); else build's
    # own isolated environment, which fetches setuptools.
    flags = ["--no-isolation"] if _setuptools_can_build() else []
    # From a clean copy: a build/ directory left in the tree would be packed as it is.
    tree = outdir.parent / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(
        ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    _run(sys.executable, "-m", "build", "--wheel", "--outdir", outdir, *flags, tree)
    [wheel] = outdir.glob("forkref-*.whl")
    return wheel


def _setuptools_can_build() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    major = int(setuptools.__version__.split(".")[0])
    return major >= 77  # what pyproject.toml's build-system asks for


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh venv with the wheel installed; its python and an environment to run it in."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(tmp / "dist")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # Without this session's PYTHONPATH (the sources), which pip would take for an install.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    _run(
        sys.executable, "-m", "pip", "--python", python, "install", "-q",
        "--no-deps", "--no-index", wheel, env=env,
    )
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(_run(python, "-c", where, env=env).stdout.strip())
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "zz_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return python, env


def test_the_wheel_holds_every_module_and_py_typed(
    installed: tuple[Path, dict[str, str]],
) -> None:
    python, env = installed
    where = _run(python, "-c", "import forkref, os; print(os.path.dirname(forkref.__file__))",
                 env=env).stdout.strip()
    package = Path(where)
    assert package.is_relative_to(python.parent.parent), f"forkref came from {package}"
    expected = {p.relative_to(SOURCE) for p in SOURCE.rglob("*.py")}
    shipped = {p.relative_to(package) for p in package.rglob("*.py")}
    assert expected <= shipped, sorted(map(str, expected - shipped))
    assert (package / "py.typed").is_file()


def test_the_installed_package_imports_and_runs_doctor(
    installed: tuple[Path, dict[str, str]],
) -> None:
    python, env = installed
    modules = sorted(
        ".".join(("forkref", *p.relative_to(SOURCE).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for p in SOURCE.rglob("*.py")
        if p.name != "__main__.py"
    )
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
    _run(python, "-c", code, *modules, env=env)
    version = _run(python.parent / "forkref", "--version", env=env).stdout.strip()
    assert version == f"forkref {forkref.__version__}"
    # One source: the wheel's metadata has the version forkref/_version.py gives.
    metadata = "import importlib.metadata as m; print(m.version('forkref'))"
    assert _run(python, "-c", metadata, env=env).stdout.strip() == forkref.__version__
    doctor = _run(python.parent / "forkref", "doctor", env=env)
    assert f"forkref {forkref.__version__} doctor" in doctor.stdout
    assert str(python.parent) in doctor.stdout  # it ran in the fresh environment
