"""One-way imports: the import-linter contract in pyproject.toml ([tool.importlinter]) holds, and it is strict enough
to catch an upward import; importing the package or its low layers pulls in neither poptorch nor the layers above."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_POPTORCH = Path(__file__).parent / "fake_poptorch"
CONTRACTS = ("layers: each module imports only from the layers below it", "nn is usable without backends or models",
             "IPU: select imports ipu, never the reverse", "no import cycles between the modules of a package")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    """Run import-linter's Python API on the package under `cwd` with `cwd`'s pyproject.toml."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_contract_is_kept():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in CONTRACTS:
        assert f"{name} KEPT" in result.stdout, result.stdout


@pytest.mark.parametrize("path, line, broken", [
    ("nn/conv.py", "from cosmolit.backends import compiling", CONTRACTS[1]),
    ("nn/bayes.py", "from cosmolit.models.targets import shape_loss", CONTRACTS[0]),
    ("backends/ipu.py", "from cosmolit.backends.select import trainer_kwargs", CONTRACTS[2]),
    ("backends/select.py", "from cosmolit.train import fit", CONTRACTS[0]),
    ("dataset.py", "from cosmolit.sim import config", CONTRACTS[0]),
])
def test_an_upward_import_breaks_the_contract(tmp_path, path, line, broken):
    shutil.copytree(ROOT / "cosmolit", tmp_path / "cosmolit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "cosmolit" / path, "a") as f:
        f.write(f"\n{line}  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0, result.stdout
    assert f"{broken} BROKEN" in result.stdout, result.stdout  # so the copy was linted, not the checkout


def _imported_after(statements: str) -> set:
    """Module names in sys.modules after running `statements` in a fresh interpreter that can find poptorch."""
    code = f"import sys\n{statements}\nprint(' '.join(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKE_POPTORCH), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_poptorch_is_importable_here_but_not_imported_by_the_package():
    assert "poptorch" in _imported_after("import poptorch")  # the test double is on the path
    modules = _imported_after("import cosmolit, cosmolit.backends, cosmolit.backends.select, "
                              "cosmolit.backends.ipu_options, cosmolit.backends.ipu")
    assert "poptorch" not in modules
    assert not any(m.startswith(("torch", "pytorch_lightning")) for m in modules)


def test_nn_runs_without_backends_or_models():
    modules = _imported_after(
        "import torch\n"
        "from cosmolit.nn.bayes import TorchBayesianShapeNet\n"
        "net = TorchBayesianShapeNet(in_channels=2, stamp=16, filters=(4, 8), targets=2, seed=0)\n"
        "loss = net.loss(torch.rand(2, 2, 16, 16), torch.rand(2, 2))\n"
        "assert loss.ndim == 0 and torch.isfinite(loss)\n")
    assert "cosmolit.nn.bayes" in modules and "cosmolit.nn.gaussian" in modules
    assert not any(m.startswith(("cosmolit.backends", "cosmolit.models", "cosmolit.train")) for m in modules)
