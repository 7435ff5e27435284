import os
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
