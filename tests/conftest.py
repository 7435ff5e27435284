import os
import signal
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CATSIM_SAMPLE = SHARED / "data" / "catsim_sample.fits"

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def catsim_sample() -> Path:
    if not CATSIM_SAMPLE.exists():
        pytest.skip("../shared/data/catsim_sample.fits is not present")
    return CATSIM_SAMPLE


@pytest.fixture(scope="session")
def synthetic_h5(tmp_path_factory) -> Path:
    """A small synthetic dataset (96 noisy stamps, 6 bands, 64x64, with clean targets); no GalSim."""
    from cosmolit.synthetic import write_synthetic_dataset

    path = tmp_path_factory.mktemp("data") / "synthetic.h5"
    return write_synthetic_dataset(path, n=96, seed=3)


@pytest.fixture(scope="session")
def synthetic_small_h5(tmp_path_factory) -> Path:
    """A tiny synthetic dataset with 32x32 stamps and 3 bands, for fast model tests."""
    from cosmolit.synthetic import write_synthetic_dataset

    path = tmp_path_factory.mktemp("data") / "synthetic_small.h5"
    return write_synthetic_dataset(path, n=48, bands="gri", size=32, seed=5)


def _interrupt_at(monkeypatch, step: int, signum=signal.SIGTERM):
    """Make the run send itself a real `signum` at the end of optimizer step `step`."""
    import cosmolit.train as train

    original = train._run_state_callback

    def patched(*args, **kwargs):
        cb = original(*args, **kwargs)
        base = type(cb).on_train_batch_end

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == step:
                os.kill(os.getpid(), signum)
                time.sleep(0.01)  # let the interpreter run the Python-level handler
            return base(self, trainer, pl_module, outputs, batch, batch_idx)

        cb.on_train_batch_end = on_train_batch_end.__get__(cb)
        return cb

    monkeypatch.setattr(train, "_run_state_callback", patched)


@pytest.fixture
def interrupt_at():
    """interrupt_at(monkeypatch, step, signum): make the next `cosmolit fit` send itself `signum`
    at the end of optimizer step `step` (undone when the monkeypatch context closes)."""
    return _interrupt_at
