"""The wheel as a user gets it: built from the checkout, installed elsewhere, imported and served
from there, with no source tree and no generated files left over from development."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, missing

pytestmark = pytest.mark.slow

# What the build reads. The test builds a copy of these, not the checkout in place: the build then
# writes nothing into the working tree (build/, egg-info), and the copy has no atelier/v1, so the
# wheel can only get its gRPC modules from proto/ through setup.py.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "proto", "atelier")
GENERATED = ("atelier/v1/__init__.py", "atelier/v1/atelier_pb2.py", "atelier/v1/atelier_pb2_grpc.py",
             "atelier/v1/atelier_pb2.pyi")
OFFLINE_PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]

ROUND_TRIP = """
import json, sys
from pathlib import Path

from atelier.retrieval.service import Limits, RetrievalService
from atelier.server.app import start_server
from atelier.server.client import AtelierClient

index, model, top_k = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
service = RetrievalService.open(index, {"cgan": model}, Limits(max_num_samples=8, max_top_k=20, max_candidates=100))
running = start_server(service, "127.0.0.1:0", max_workers=4)
try:
    with AtelierClient(running.target, timeout=60) as client:
        client.wait_ready()
        schema = client.get_schema()
        response = client.generate_and_retrieve({"category": "Trouser"}, num_samples=2, top_k=top_k, seed=3)
finally:
    running.stop(grace=1)
modules = {name: module.__spec__.origin for name, module in sys.modules.items()
           if name == "atelier" or name.startswith("atelier.")}
print(json.dumps({
    "modules": modules, "sys_path": sys.path, "meta_path": [repr(finder) for finder in sys.meta_path],
    "models": [m.name for m in schema.models], "default_model": schema.default_model,
    "groups": [g.name for g in schema.groups], "products": [p.id for p in response.products],
    "model": response.model,
}))
"""


def run_installed(target: Path, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """The venv's python, seeing the installed copy in `target` and never the checkout.

    PYTHONPATH alone would already come before the venv's editable install (its finder is appended
    to sys.meta_path, after the PYTHONPATH entries), but `-S` makes that independent of how the
    editable install was made: without `site`, no .pth file runs, so neither an editable finder nor a
    checkout path entry exists; PYTHONPATH then lists the installed copy first and the venv's
    site-packages (torch, grpc, ...) after it. The cwd is outside the checkout for the same reason.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=os.pathsep.join([str(target), *site.getsitepackages()]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def snapshot_of_checkout(dest: Path) -> Path:
    dest.mkdir()
    for name in BUILD_INPUTS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, dest / name)
    shutil.rmtree(dest / "atelier" / "v1", ignore_errors=True)
    return dest


def checked(result: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the folder it is installed in with `pip install --target`)."""
    absent = [m for m in ("setuptools", "wheel", "grpc_tools") if importlib.util.find_spec(m) is None]
    if absent:
        missing(f"building the wheel offline needs {', '.join(absent)} in this environment (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("packaging")
    source = snapshot_of_checkout(root / "source")
    # No build isolation and no index: the build uses this venv's setuptools and grpcio-tools, offline.
    checked(subprocess.run([*OFFLINE_PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(root / "wheels"), "."], cwd=source, capture_output=True, text=True, timeout=300),
            "pip wheel")
    (wheel,) = (root / "wheels").glob("atelier-*.whl")
    # --no-deps: the installed copy reuses the venv's dependencies (see run_installed).
    checked(subprocess.run([*OFFLINE_PIP, "install", "--no-deps", "--no-index", "--target", str(root / "site"),
                            str(wheel)], cwd=root, capture_output=True, text=True, timeout=300), "pip install --target")
    return wheel, root / "site"


def test_the_wheel_ships_the_generated_grpc_modules(installed):
    wheel, target = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(GENERATED) <= names, sorted(n for n in names if n.startswith("atelier/v1"))
    assert all((target / name).is_file() for name in GENERATED)
    assert "atelier/server/protogen.py" in names and not any(n.startswith("proto/") for n in names)
    web = [f"atelier/server/web/{name}" for name in ("index.html", "app.js", "style.css")]  # `atelier serve --http`
    assert set(web) <= names and all((target / name).is_file() for name in web)


def test_the_installed_cli_lists_its_verbs(installed, tmp_path):
    from atelier.cli import build_parser

    _, target = installed
    probe = checked(run_installed(target, ["-c", "import atelier.cli; print(atelier.cli.__file__)"], tmp_path, 120),
                    "import atelier.cli")
    assert Path(probe.stdout.strip()).is_relative_to(target)
    result = checked(run_installed(target, ["-m", "atelier.cli", "--help"], tmp_path, 120), "atelier --help")
    (verbs,) = [action.choices for action in build_parser()._actions if action.dest == "verb"]
    assert verbs and all(verb in result.stdout for verb in verbs), result.stdout


def test_the_installed_server_and_client_do_a_round_trip(installed, small_index, tiny_model, tmp_path):
    _, target = installed
    script = tmp_path / "round_trip.py"
    script.write_text(ROUND_TRIP)
    result = checked(run_installed(target, [str(script), str(small_index), str(tiny_model), "5"], tmp_path, 300),
                     "the round trip with the installed copy")
    report = json.loads(result.stdout.strip().splitlines()[-1])

    modules = report["modules"]
    assert {"atelier", "atelier.v1.atelier_pb2", "atelier.v1.atelier_pb2_grpc", "atelier.server.wire"} <= set(modules)
    outside = {name: origin for name, origin in modules.items() if not Path(origin).is_relative_to(target)}
    assert not outside, f"imported from outside the installed copy: {outside}"
    assert all(Path(entry or ".").resolve() != REPO for entry in report["sys_path"]), report["sys_path"]
    assert not any("Editable" in finder for finder in report["meta_path"]), report["meta_path"]

    assert report["models"] == ["cgan"] and report["default_model"] == "cgan" and report["groups"] == ["category"]
    assert report["model"] == "cgan"
    assert len(report["products"]) == 5 and len(set(report["products"])) == 5
