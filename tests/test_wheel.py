"""The built wheel works on its own: installed (not editable) and run from a folder outside the
repository, `python -m hybridjax.train` finds the Hydra tree inside the package and trains, and
`python -m experiments.report` reads the run."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import yaml

from tests.train.conftest import TINY, TINY_MQAR

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _copy_sources(dest):
    """What the build reads, copied so that it leaves no build/ or egg-info in the checkout: the
    metadata files and the top-level folder of every package pyproject.toml lists."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    folders = {
        setuptools.get("package-dir", {}).get(p, p.replace(".", "/")).split("/")[0]
        for p in setuptools["packages"]
    }
    os.makedirs(dest)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), dest)
    for folder in folders:
        shutil.copytree(
            os.path.join(ROOT, folder),
            os.path.join(dest, folder),
            ignore=shutil.ignore_patterns("__pycache__"),
        )


def _packages_on_disk():
    """Wheel paths of every package folder (with __init__.py) and config file in the checkout."""
    paths = set()
    for top in ("hybridjax", "experiments"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files:
                paths.add(os.path.relpath(os.path.join(folder, "__init__.py"), ROOT))
    for folder, _, files in os.walk(os.path.join(ROOT, "configs")):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), ROOT)
            paths.add(os.path.join("hybridjax", rel))
    return {p.replace(os.sep, "/") for p in paths}


def test_installed_wheel_trains_outside_the_repository(tmp_path):
    _copy_sources(tmp_path / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(tmp_path / "src"),
            "-w",
            str(tmp_path / "wheels"),
        ]
    )
    (wheel,) = (tmp_path / "wheels").glob("hybridjax-*.whl")
    missing = _packages_on_disk() - set(zipfile.ZipFile(wheel).namelist())
    assert not missing, f"not in the wheel (list them in pyproject.toml): {sorted(missing)}"

    site = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)])
    work = tmp_path / "work"
    work.mkdir()
    # The installed copy comes first on the path; the dependencies come from this environment.
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    # One MLP layer: what is checked here is the install, and this compiles fastest.
    tiny = [o for o in TINY if not o.startswith("model.pattern=")]
    _run(
        [
            sys.executable,
            "-m",
            "hybridjax.train",
            *tiny,
            *TINY_MQAR,
            "model.pattern=-",
            "trainer.steps=2",
            "hydra.run.dir=run",
        ],
        cwd=work,
        env=env,
    )
    with open(work / "run" / ".hydra" / "hydra.yaml") as f:
        sources = yaml.safe_load(f)["hydra"]["runtime"]["config_sources"]
    main = next(s["path"] for s in sources if s["provider"] == "main")
    assert main == str(site / "hybridjax" / "configs")
    with open(work / "run" / "summary.json") as f:
        assert json.load(f)["step"] == 2

    _run([sys.executable, "-m", "experiments.report", "run", "--out", "report"], cwd=work, env=env)
    assert (work / "report" / "report.md").exists()
