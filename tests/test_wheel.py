"""The built wheel is self-sufficient: installed into a fresh venv it runs its own examples from anywhere.

The fresh venv gets the already-installed heavy dependencies (torch, TorchRec, FBGEMM...) through one
``.pth`` line naming this interpreter's site-packages, so nothing is downloaded; the package itself comes
only from the wheel (the venv's own site-packages is searched first).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# what a wheel build must not see: environments, outputs, caches
SKIP = {
    ".git",
    ".venv",
    "runs",
    "data",
    "build",
    "dist",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".whl",
    ".venv-deepctr",
}


def _run(*cmd, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _ignore(_dir: str, names: list) -> set:
    return {n for n in names if n in SKIP or n.endswith(".egg-info") or n.startswith("torchx_")}


def test_wheel_in_a_fresh_venv_runs_synth_and_train_with_a_packaged_config(tmp_path):
    # build from a copy: the build writes build/ and *.egg-info next to the sources
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_ignore)
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        tmp_path / "dist",
        src,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("mlet_torchrec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("mlet_torchrec/configs/")}
    expected = {f"mlet_torchrec/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped == expected

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip()
    )
    (site / "reuse-installed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel, cwd=tmp_path)

    work = tmp_path / "elsewhere"  # outside the repository: no configs/ folder, no source tree
    work.mkdir()
    where = _run(python, "-c", "import mlet_torchrec; print(mlet_torchrec.__file__)", cwd=work).stdout.strip()
    assert Path(where).is_relative_to(site), where
    mlet = venv / "bin" / "mlet"
    _run(
        mlet,
        "synth",
        "--output",
        "data/tiny",
        "rows=2000",
        "num_sparse=4",
        "max_cardinality=200",
        "row_group_size=512",
        cwd=work,
    )
    trained = _run(mlet, "train", "--config", "tiny", "train.max_steps=10", "train.eval_batch_size=256", cwd=work)
    assert (work / "runs" / "tiny" / "metrics.json").is_file() and "trained 10 steps" in trained.stdout
    assert not (work / "configs").exists()
