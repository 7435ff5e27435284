"""The GalSim simulator: fluxes, shapes, blends, noise, reproducibility, shards, catalogs."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

galsim = pytest.importorskip("galsim")

from cosmolit.errors import UsageError  # noqa: E402
from cosmolit.sim import SimulationConfig, draw_stamps, load_simulation_config, merge_files, simulate_to_file  # noqa: E402
from cosmolit.sim import simulate as sim_module  # noqa: E402
from cosmolit.sim.population import (SED_NAMES, exact_band_fluxes, band_fluxes,  # noqa: E402
                                     load_seds_and_bandpasses)


def small(**over) -> SimulationConfig:
    base = {"stamp_size": 32, "bands": "gri"}
    base.update(over)
    return load_simulation_config(None, base)


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("sed", range(len(SED_NAMES)))
def test_tabulated_band_fluxes_match_calculate_flux_within_0p2_percent(sed):
    # midpoints of the 0.01 redshift grid, where linear interpolation is worst (every 7th, for time;
    # z = 0.005 among them, the worst measured: 0.19 %)
    for z in np.arange(0.005, 4.0, 0.01)[::7]:
        ratio = band_fluxes(sed, z) / exact_band_fluxes(sed, z)
        assert np.all(np.abs(ratio - 1) < 0.002), (z, ratio)


def test_colours_follow_the_sed_at_the_redshift():
    """The embedded galaxy's bulge and disk magnitudes equal GalSim's, component by component."""
    from cosmolit.sim.population import EmbeddedPopulation

    seds, bps = load_seds_and_bandpasses()
    pop = EmbeddedPopulation(SimulationConfig().population)
    rng = np.random.default_rng(4)
    for _ in range(5):
        g = pop.sample(rng)
        disk_sed = seds[SED_NAMES[g.sed_type]].atRedshift(g.redshift)
        mag_i = -2.5 * np.log10(g.disk_maggies[3])
        disk_sed = disk_sed.withMagnitude(mag_i, bps["i"].withZeropoint("AB"))
        for k, b in enumerate("ugrizy"):
            expected = disk_sed.calculateMagnitude(bps[b].withZeropoint("AB"))
            assert abs(-2.5 * np.log10(g.disk_maggies[k]) - expected) < 0.01


def test_drawn_flux_per_band_matches_magnitudes():
    cfg = load_simulation_config(None, {"stamp_size": 64, "noise.mode": "none",
                                        "population.hlr_max": 0.4, "population.mag_i_max": 23.0})
    from cosmolit.sim.survey import band_surveys

    images, clean, truth = draw_stamps(cfg, 4, seed=2)
    for k, band in enumerate(band_surveys(cfg)):
        expected = band.mag_to_electrons(truth[f"mag_{band.band}"])
        np.testing.assert_allclose(clean[:, k].sum(axis=(1, 2)), expected, rtol=0.02)
    np.testing.assert_array_equal(images, clean)  # noiseless, isolated


def test_adaptive_moments_recover_truth_ellipticity_without_psf():
    cfg = load_simulation_config(None, {"stamp_size": 64, "bands": "i", "noise.mode": "none",
                                        "population.hlr_min": 0.8, "population.hlr_max": 1.1,
                                        "population.e_max": 0.6, "population.disk_only": True})
    # PSF-free and noiseless; disks only, as a pixelated de Vaucouleurs cusp biases adaptive moments
    images, _, truth = draw_stamps(cfg, 8, seed=11, psf=False)
    assert np.all(truth["bulge_frac"] == 0) and np.ptp(truth["e1"]) > 0.1
    for j in range(len(images)):
        shape = galsim.hsm.FindAdaptiveMom(galsim.Image(images[j, 0], scale=0.2)).observed_shape
        assert abs(shape.e1 - truth["e1"][j]) < 0.01 and abs(shape.e2 - truth["e2"][j]) < 0.01
        g = galsim.Shear(e1=truth["e1"][j], e2=truth["e2"][j])
        assert abs(g.g1 - truth["g1"][j]) < 1e-9 and abs(g.g2 - truth["g2"][j]) < 1e-9


def test_blends_place_neighbours_in_the_annulus():
    cfg = small(**{"blend.fraction": 1.0, "blend.max_neighbors": 2, "blend.min_separation": 0.5,
                   "blend.max_separation": 1.2})
    images, clean, truth = draw_stamps(cfg, 24, seed=5)
    assert np.all(truth["is_blend"] == 1)
    assert set(truth["n_neighbors"]) <= {1, 2} and len(set(truth["n_neighbors"])) == 2
    for k in range(2):
        present = k < truth["n_neighbors"]
        r = np.hypot(truth[f"nb{k}_dx"], truth[f"nb{k}_dy"])
        assert np.all((r[present] >= 0.5) & (r[present] <= 1.2))
        assert np.all(np.isnan(r[~present]))
    assert np.all((truth["blendedness"] > 0) & (truth["blendedness"] < 1))
    isolated = draw_stamps(small(), 8, seed=5)[2]
    assert np.all(isolated["n_neighbors"] == 0) and np.all(isolated["blendedness"] == 0)
    assert np.all(np.isnan(isolated["nb0_dx"]))


def test_mixed_fraction_gives_both_kinds():
    truth = draw_stamps(small(**{"blend.fraction": 0.5}), 40, seed=1)[2]
    assert 8 < truth["is_blend"].sum() < 32


def test_poisson_noise_has_sky_plus_source_variance():
    from cosmolit.sim.survey import band_surveys

    cfg = small(**{"noise.visits": 10})
    images, clean, _ = draw_stamps(cfg, 12, seed=3)
    pulls = (images - clean) / np.sqrt(np.array([b.sky_level for b in band_surveys(cfg)])[None, :, None, None] + clean)
    assert abs(pulls.std() - 1) < 0.05 and abs(pulls.mean()) < 0.05


def test_scene_is_the_image_before_noise_and_the_sky_level_is_stored(tmp_path):
    import h5py

    from cosmolit.dataset import inspect_dataset
    from cosmolit.sim.survey import band_surveys

    cfg = small(**{"blend.fraction": 0.5, "noise.visits": 10, "store_scene": True})
    path = simulate_to_file(cfg, tmp_path / "s.h5", n=16, seed=4, progress=False)
    assert inspect_dataset(path).has_scene
    with h5py.File(path, "r") as f:
        images, clean, scene = f["images"][:], f["clean"][:], f["scene"][:]
        blend = f["truth/is_blend"][:].astype(bool)
        sky = f.attrs["sky_level"]
    np.testing.assert_allclose(sky, [b.sky_level for b in band_surveys(cfg)])
    assert 0 < blend.sum() < len(blend)
    assert np.array_equal(scene[~blend], clean[~blend])  # an isolated galaxy's scene is the galaxy
    extra = (scene - clean)[blend]  # the neighbours' light
    assert extra.min() > -1e-3 * scene.max() and np.all(extra.sum((1, 2, 3)) > 0)
    pulls = (images - scene) / np.sqrt(sky[None, :, None, None] + np.clip(scene, 0, None))
    assert abs(pulls.std() - 1) < 0.05 and abs(pulls.mean()) < 0.05


def test_same_bytes_whatever_workers_and_for_shards_then_merge(tmp_path):
    cfg = small(**{"blend.fraction": 0.5, "store_scene": True})
    one = simulate_to_file(cfg, tmp_path / "one.h5", n=40, seed=9, workers=1, progress=False)
    two = simulate_to_file(cfg, tmp_path / "two.h5", n=40, seed=9, workers=2, progress=False)
    assert digest(one) == digest(two)
    shards = [simulate_to_file(cfg, tmp_path / f"s{i}.h5", n=40, seed=9, shard=i, num_shards=3, progress=False)
              for i in (2, 0, 1)]
    merged = merge_files(tmp_path / "merged.h5", shards, progress=False)
    assert digest(merged) == digest(one)
    other = simulate_to_file(cfg, tmp_path / "other.h5", n=40, seed=10, progress=False)
    assert digest(other) != digest(one)
    with pytest.raises(UsageError, match="missing index"):
        merge_files(tmp_path / "bad.h5", shards[:2], progress=False)
    with pytest.raises(UsageError, match="not from the same run"):
        merge_files(tmp_path / "bad.h5", [shards[0], shards[1], other], progress=False)
    assert not (tmp_path / "bad.h5").exists()


def test_file_has_the_format_attributes_and_truth(tmp_path):
    from cosmolit.dataset import inspect_dataset
    from cosmolit.sim.config import config_from_yaml_text

    cfg = small(**{"store_clean": False})
    path = simulate_to_file(cfg, tmp_path / "a.h5", n=5, seed=1, progress=False)
    info = inspect_dataset(path)
    assert (info.n, info.bands, info.stamp, info.seed, info.has_clean) == (5, "gri", (32, 32), 1, False)
    np.testing.assert_allclose(info.psf_fwhm, [0.86, 0.81, 0.79])
    assert config_from_yaml_text(info.config) == cfg
    assert {"e1", "e2", "g1", "g2", "redshift", "mag_y", "snr", "blendedness", "nb2_mag_i"} <= set(info.truth_names)


def test_interrupted_run_leaves_no_file(tmp_path, monkeypatch):
    calls = []
    real = sim_module._draw_range

    def flaky(args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(args)

    monkeypatch.setattr(sim_module, "_draw_range", flaky)
    with pytest.raises(KeyboardInterrupt):
        simulate_to_file(small(), tmp_path / "x.h5", n=40, seed=0, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("over, message", [
    ({"stamp_size": 40}, "multiple of 16"),
    ({"bands": "gix"}, "unknown: x"),
    ({"blend.fraction": 1.5}, r"\[0, 1\]"),
    ({"blend.max_neighbors": 0}, "at least 1"),
    ({"noise.mode": "gauss"}, "poisson"),
    ({"noise.mode": "none", "store_scene": True}, "store_scene"),
])
def test_bad_config_values_are_usage_errors(over, message):
    with pytest.raises(UsageError, match=message):
        load_simulation_config(None, over)


def test_bad_run_arguments(tmp_path):
    cfg = small()
    for kwargs, message in [({"n": 0}, "n must be"), ({"shard": 2, "num_shards": 2}, "shard index"),
                            ({"num_shards": 2}, "needs --shard"), ({"workers": 0}, "workers")]:
        args = {"n": 4, "seed": 0, **kwargs}
        with pytest.raises(UsageError, match=message):
            simulate_to_file(cfg, tmp_path / "x.h5", progress=False, **args)
    (tmp_path / "x.h5").write_text("keep")
    with pytest.raises(UsageError, match="--force"):
        simulate_to_file(cfg, tmp_path / "x.h5", n=4, seed=0, progress=False)
    assert (tmp_path / "x.h5").read_text() == "keep"


def test_catsim_catalog_reads_and_draws(catsim_sample):
    from astropy.table import Table

    cfg = small(catalog=str(catsim_sample), **{"blend.fraction": 0.5})
    images, clean, truth = draw_stamps(cfg, 12, seed=0)
    table = Table.read(catsim_sample)
    rows = truth["catalog_row"]
    assert np.all(rows >= 0) and np.all(truth["sed_type"] == -1)
    assert np.all(np.asarray(table["i_ab"])[rows] <= 25.3)
    np.testing.assert_allclose(truth["redshift"], np.asarray(table["redshift"])[rows])
    assert np.all(truth["mag_i"] >= np.asarray(table["i_ab"])[rows] - 1e-9)  # dropped size-less parts only dim
    assert np.all(np.isfinite(images)) and clean[:, 2].sum() > 0


def test_catalog_missing_columns_are_named(tmp_path, catsim_sample):
    from astropy.table import Table

    table = Table.read(catsim_sample)
    table.remove_columns(["a_d", "y_ab"])
    bad = tmp_path / "bad.fits"
    table.write(bad)
    with pytest.raises(UsageError, match="a_d, y_ab"):
        simulate_to_file(small(catalog=str(bad)), tmp_path / "x.h5", n=2, seed=0, progress=False)
    assert not (tmp_path / "x.h5").exists()


def _plenty_of_space(monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**60, 0, 2**60))


def test_a_huge_run_starts_at_once_in_bounded_memory_and_shows_progress_from_the_first_block(tmp_path, monkeypatch):
    import time
    import tracemalloc

    import cosmolit.progress

    _plenty_of_space(monkeypatch)
    calls, advanced = [], []
    real = sim_module._draw_range

    def first_block_then_stop(args):
        calls.append(args[2:4])
        if len(calls) == 2:
            assert advanced == [sim_module.UNIT]  # the first block was counted before the second is drawn
            raise KeyboardInterrupt
        return real(args)

    class Bar:
        def __init__(self, total, description, enabled=True):
            pass

        def __enter__(self):
            return advanced.append

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(sim_module, "_draw_range", first_block_then_stop)
    monkeypatch.setattr(cosmolit.progress, "progress_bar", Bar)
    cfg = small()
    real((cfg.to_yaml(), 0, 0, 1, True))  # build the drawer outside the measurement
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        simulate_to_file(cfg, tmp_path / "x.h5", n=10**8, seed=0, progress=True)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert calls == [(0, 16), (16, 32)]
    assert peak < 20e6 and elapsed < 20, (peak, elapsed)  # no per-stamp or per-block state for the run
    assert list(tmp_path.iterdir()) == []


def test_workers_killed_from_outside_fail_the_run_without_hanging(tmp_path, monkeypatch):
    import multiprocessing
    import os
    import signal

    import cosmolit.progress

    class KillWorkers:  # a scheduler's signal reaching the workers after the first block
        def __init__(self, total, description, enabled=True):
            pass

        def __enter__(self):
            def advance(k):
                for p in multiprocessing.active_children():
                    os.kill(p.pid, signal.SIGKILL)
            return advance

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(cosmolit.progress, "progress_bar", KillWorkers)
    with pytest.raises(RuntimeError, match="simulation worker 1 died"):
        simulate_to_file(small(), tmp_path / "x.h5", n=96, seed=0, workers=2, progress=True)
    assert list(tmp_path.iterdir()) == [] and multiprocessing.active_children() == []
