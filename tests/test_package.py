"""`pip install .` in a fresh virtual environment gives the package, its metadata and the `stylize` command."""

import shutil
import site
import subprocess
import venv
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def test_pip_install_gives_the_package_and_the_stylize_command(tmp_path):
    # The environment sees the packages of the one running the tests (torch is gigabytes; requirements-dev.txt
    # brings the setuptools the build needs), not the base Python's, which may hold an older setuptools: the
    # build runs with what the test run was installed with, and installs the project afresh.
    venv.create(tmp_path / "env")
    python, command = tmp_path / "env" / "bin" / "python", tmp_path / "env" / "bin" / "stylize"
    inherited = "".join(f"import site; site.addsitedir({folder!r})\n" for folder in site.getsitepackages())
    own = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(own) / "inherited.pth").write_text(inherited)  # after the environment's own folder: its install wins
    source = tmp_path / "source"  # what the build reads, copied: it leaves its build folders beside it
    shutil.copytree(ROOT / "stylize", source / "stylize", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE", "requirements.txt"):
        shutil.copy(ROOT / name, source)
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    elsewhere = tmp_path / "elsewhere"  # not the repository: the installed copy must be the one found
    elsewhere.mkdir()

    def run(*args: object) -> str:
        return subprocess.run(
            [*map(str, args)], check=True, capture_output=True, text=True, timeout=300, cwd=elsewhere
        ).stdout

    assert run(command, "--help").startswith("usage: stylize ")
    assert run(python, "-m", "stylize", "--help").startswith("usage: python -m stylize ")
    location = run(python, "-c", "import stylize; print(stylize.__file__)")
    assert location.startswith(str(tmp_path / "env"))
    requires = run(python, "-c", "import importlib.metadata as m; print(*m.requires('stylize'), sep='\\n')")
    listed = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert {Requirement(line) for line in requires.splitlines() if "extra ==" not in line} == {
        Requirement(line) for line in listed if line
    }  # the same dependencies as a Space installs
