"""The wheel is the product: one import root, configs and data inside, works from anywhere.

Builds the wheel, installs it (not editable) into a fresh virtual environment whose only
other entry is the project venv's site-packages for the dependencies (a path added by a
.pth line, so the editable install's finder is not loaded), then runs the installed
``dareflow`` command from a folder outside the checkout, and the import contracts
(``lint-imports``) on the installed package, where every layer lies in one folder.
"""

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built from a copy: setuptools' build/ folder must not land in (or go stale in) the checkout
    src = tmp_path_factory.mktemp("src") / "dareflow"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "__pycache__", "*.egg-info", "dareflow-demo", ".bench", "out"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, capture_output=True,
                   timeout=300)
    [whl] = out.glob("dareflow-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True, timeout=300)
    purelib = subprocess.run([str(python), "-c", ("import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])")], check=True,
                             capture_output=True, text=True).stdout.strip()
    deps = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    Path(purelib, "dareflow-test-deps.pth").write_text("\n".join(deps) + "\n")
    return venv


def _run(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_wheel_holds_only_dareflow_with_its_configs_and_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    roots = {n.split("/")[0] for n in names}
    assert roots == {"dareflow", wheel.name.split("-py")[0] + ".dist-info"}
    for needed in ("dareflow/configs/suites/openllm_v1.yaml", "dareflow/configs/demo/demo.yaml",
                   "dareflow/configs/paper/supermario_v2.yaml",
                   "dareflow/configs/sweeps/demo_grid.yaml",
                   "dareflow/evaluation/data/truthfulqa_mc.jsonl",
                   "dareflow/configs/suites/skills/arithmetic.jsonl",
                   "dareflow/evaluation/data/ATTRIBUTION.md",
                   "dareflow/flows/merge.py", "dareflow/tasks/merge.py",
                   "dareflow/deployments/deploy.py", "dareflow/cli/__init__.py"):
        assert needed in names


def test_installed_wheel_works_from_outside_the_checkout(fresh_venv, tmp_path):
    where = _run(fresh_venv, "python", "-c", "import dareflow, dareflow.flows.demo as d; "
                 "print(dareflow.__file__); print(d.DEMO_RECIPE); print(dareflow.__version__)",
                 cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    module, recipe, version = where.stdout.split()
    assert module.startswith(str(fresh_venv)) and recipe.startswith(str(fresh_venv))
    assert Path(recipe).is_file() and version == "0.1.0"

    validate = _run(fresh_venv, "dareflow", "validate", "openllm_v1", "demo_skills",
                    "paper/supermario_v2", cwd=tmp_path)
    assert validate.returncode == 0, validate.stderr
    assert "ok   openllm_v1: suite: openllm_v1, 6 task(s)" in validate.stdout
    assert "ok   paper/supermario_v2: recipe:" in validate.stdout

    ls = _run(fresh_venv, "dareflow", "ls", cwd=tmp_path)
    assert ls.returncode == 0 and "dare_ties" in ls.stdout


def test_import_contracts_hold_on_the_installed_package(fresh_venv):
    check = _run(fresh_venv, "python", "-c",
                 "import sys; from importlinter.cli import lint_imports; "
                 "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))",
                 cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "0 broken" in check.stdout
