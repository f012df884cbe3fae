"""The wheel: built from the tracked files with every Python warning an error (a quiet first
`make demo`), holding every file the daemon reads at run time, and working when installed on its own.

The build calls setuptools' PEP 517 backend (``setuptools.build_meta.build_wheel``) in a subprocess
run with ``-W error``, on a copy of the files git tracks (a fresh clone, without build/ or
egg-info left-overs). The installed-wheel check runs a Python that sees the wheel's files and the
virtual environment's dependencies but not the editable install (no ``.pth`` processing), and
loads each data file through the same code path the daemon uses.
"""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: source folder -> where package-dir puts it in the wheel
PACKAGE_DIRS = {"daemon": "beamlens/daemon", "consumers": "beamlens/consumers", "models": "beamlens/models"}


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [line for line in out.splitlines() if (ROOT / line).is_file()]


def runtime_data_files(files: list[str]) -> dict[str, str]:
    """Tracked non-Python files the product ships -> their path inside the wheel."""
    wanted: dict[str, str] = {}
    for f in files:
        top, _, rest = f.partition("/")
        if top in PACKAGE_DIRS and not f.endswith(".py") and "__pycache__" not in f:
            wanted[f] = f"{PACKAGE_DIRS[top]}/{rest}"
        elif top == "configs" and "/" not in rest and rest.endswith(".yaml"):
            wanted[f] = f"beamlens/configs/{rest}"
    return wanted


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    files = tracked_files()
    src = tmp_path_factory.mktemp("clone")
    with tarfile.open(src / "tree.tar", "w") as tar:
        for f in files:
            tar.add(ROOT / f, arcname=f)
    with tarfile.open(src / "tree.tar") as tar:
        tar.extractall(src / "tree", filter="data")
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-W", "error", "-c",
         "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))", str(out)],
        cwd=src / "tree", capture_output=True, text=True, timeout=300)
    log = build.stdout + build.stderr
    assert build.returncode == 0, f"wheel build failed or warned:\n{log[-6000:]}"
    assert "Warning" not in log, log[-6000:]
    (whl,) = out.glob("beamlens-*.whl")
    return whl


def test_wheel_builds_without_warnings_and_holds_every_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = runtime_data_files(tracked_files())
    # the files the code opens by path, named here so a rename that breaks the package fails loudly
    for must in ("daemon/sinks/web/index.html", "daemon/sinks/web/app.js", "daemon/sinks/web/style.css",
                 "daemon/sim/data/fe_l2p_stxm/toner_71214098_Fe2p_stxm_stack.npz",
                 "consumers/data/fe_k_xanes/xasdatalibrary/Fe_metal_rt_01.xdi",
                 "models/defect_net.onnx", "models/defect_net.json", "configs/demo.yaml"):
        assert must in wanted, must
    missing = sorted(w for f, w in wanted.items() if w not in names)
    assert not missing, f"not in the wheel: {missing}"
    meta = zipfile.ZipFile(wheel).read("beamlens-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: BSD-3-Clause" in meta


CHECK = r"""
import json, sys
target, site = sys.argv[1], sys.argv[2]
sys.path[:0] = [target, site]          # the wheel first; dependencies from the venv, no .pth files
import beamlens.daemon, beamlens.consumers, beamlens.models
from beamlens.daemon.cli import default_demo_config
from beamlens.daemon.config import load_config
from beamlens.daemon.sim.datasets import stxm_map, corroding_steel_map
from beamlens.daemon.sinks.http import WEB
from beamlens.consumers.spectral.references import vendored_library
from beamlens.models.defect_net import load_session, REAL_FRAMES_DIR
m = stxm_map()
config = load_config(default_demo_config())
print(json.dumps({
    "modules": [beamlens.daemon.__file__, beamlens.consumers.__file__, beamlens.models.__file__],
    "demo_config": str(default_demo_config()), "consumers": [c.name for c in config.consumers],
    "stxm_shape": list(m.spectra.shape), "steel_shape": list(corroding_steel_map().spectra.shape),
    "references": len(vendored_library()),
    "web": sorted(p.name for p in WEB.iterdir()),
    "model_inputs": [i.name for i in load_session().get_inputs()],
    "real_frames": sorted(p.name for p in REAL_FRAMES_DIR.glob("*.npy")),
}))
"""


def test_installed_wheel_reads_its_data_at_run_time(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                    "--target", str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    site = sysconfig.get_paths()["purelib"]
    run = subprocess.run([sys.executable, "-I", "-S", "-c", CHECK, str(target), site],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(path.startswith(str(target)) for path in found["modules"]), found["modules"]
    assert found["demo_config"].startswith(str(target))
    assert {"stats", "pca", "embedding", "unmixing", "defects"} <= set(found["consumers"])
    assert found["stxm_shape"][-1] == 123 and found["steel_shape"][-1] > 50
    assert found["references"] >= 20
    assert {"index.html", "app.js", "style.css"} <= set(found["web"])
    assert found["model_inputs"] and len(found["real_frames"]) == 2
