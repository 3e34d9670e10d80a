"""The installed shape of the project (pyproject.toml): the msrec-train console script, the file
form of train.py, the package list and the pins shared with requirements.txt."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_msrec_train_console_script_runs():
    script = os.path.join(os.path.dirname(sys.executable), "msrec-train")
    assert os.access(script, os.X_OK), f"{script} missing: run `make setup` (pip install -e .)"
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--config" in proc.stdout


def test_train_py_runs_as_a_file():
    proc = subprocess.run([sys.executable, os.path.join("msrec_dist", "train.py"), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--config" in proc.stdout


def test_every_subpackage_is_installed():
    """A sub-package missing from [tool.setuptools] packages imports in the editable install but
    is left out of a wheel."""
    setuptools = pyproject()["tool"]["setuptools"]
    found = {"msrec_dist." + d for d in os.listdir(os.path.join(REPO, "msrec_dist"))
             if os.path.exists(os.path.join(REPO, "msrec_dist", d, "__init__.py"))}
    assert set(setuptools["packages"]) == {"msrec_dist", "msrec_dist.kernels"} | found
    assert setuptools["package-dir"] == {"msrec_dist.kernels": "kernels"}


def test_pins_match_requirements_txt():
    """pyproject's dependencies and `dev` extra are requirements.txt's pins, the same versions."""
    def pins(lines):
        return {ln.split("==")[0].strip().lower(): ln.strip() for ln in lines
                if ln.strip() and not ln.lstrip().startswith("#")}

    with open(os.path.join(REPO, "requirements.txt")) as f:
        required = pins(f)
    project = pyproject()["project"]
    declared = pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    assert all("==" in p for p in declared.values()), declared
    assert declared == required
