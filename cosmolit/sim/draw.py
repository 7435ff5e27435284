"""Drawing one stamp: target (+ neighbours), per band, convolved with the band's PSF, plus noise.

A StampDrawer is built once per process (PSFs, survey numbers, flux table, catalog) and then
draws stamp `index` of a run from its own seed, so results never depend on which process drew it.
"""

from __future__ import annotations

import numpy as np

from cosmolit.sim.config import LSST_BANDS, SimulationConfig
from cosmolit.sim.population import EmbeddedPopulation, Galaxy
from cosmolit.sim.survey import band_surveys, make_psf


def stamp_seeds(seed: int, index: int) -> tuple[np.random.SeedSequence, int]:
    """(numpy SeedSequence, galsim seed) of stamp `index`: children (index, 0) and (index, 1) of SeedSequence(seed).

    The same as SeedSequence(seed).spawn(index + 1)[index].spawn(2), without spawning all stamps.
    """
    np_seq = np.random.SeedSequence(seed, spawn_key=(index, 0))
    gs_seq = np.random.SeedSequence(seed, spawn_key=(index, 1))
    galsim_seed = int(gs_seq.generate_state(1, np.uint32)[0]) % (2**31 - 2) + 1  # galsim: 0 means "from time"
    return np_seq, galsim_seed


def truth_columns(config: SimulationConfig) -> tuple[list[str], dict[str, str]]:
    """Names of the truth columns written for `config`, and the dtypes of the non-float ones."""
    names = ["e1", "e2", "g1", "g2", "redshift"] + [f"mag_{b}" for b in LSST_BANDS]
    names += ["hlr", "bulge_frac", "snr", "sed_type", "catalog_row", "is_blend", "n_neighbors", "blendedness"]
    for k in range(config.blend.max_neighbors):
        names += [f"nb{k}_dx", f"nb{k}_dy", f"nb{k}_mag_i"]
    dtypes = {"sed_type": "i4", "catalog_row": "i4", "is_blend": "i4", "n_neighbors": "i4"}
    return names, dtypes


class StampDrawer:
    """Per-process drawing state for one SimulationConfig."""

    def __init__(self, config: SimulationConfig, psf: bool = True):
        import galsim

        self.galsim = galsim
        self.cfg = config
        self.bands = band_surveys(config)
        self.band_index = np.array([LSST_BANDS.index(b.band) for b in self.bands])
        # built once, reused for every stamp; psf=False (tests only) draws the bare galaxy
        self.psfs = [make_psf(config, b) if psf else None for b in self.bands]
        # electrons per AB maggie in each band: exposure * 10**(0.4 zp)
        self.e_per_maggie = np.array([b.mag_to_electrons(0.0) for b in self.bands])
        self.sky = np.array([b.sky_level for b in self.bands])
        # reference band of snr and blendedness: i when simulated, else the first band
        self.ref = config.bands.index("i") if "i" in config.bands else 0
        self.size = config.stamp_size
        self.population = EmbeddedPopulation(config.population)
        self.catalog = None
        if config.catalog is not None:
            from cosmolit.sim.catalog import load_catalog

            self.catalog = load_catalog(config.catalog, config.population.mag_i_max)

    # ---- sampling -------------------------------------------------------------------------
    def _sample_scene(self, rng: np.random.Generator) -> tuple[Galaxy, list[tuple[Galaxy, float, float]]]:
        blend = self.cfg.blend
        is_blend = blend.fraction > 0 and rng.uniform() < blend.fraction
        n_nb = int(rng.integers(1, blend.max_neighbors + 1)) if is_blend else 0
        if self.catalog is None:
            target = self.population.sample(rng)
            others = [self.population.sample(rng) for _ in range(n_nb)]
        else:
            row = int(rng.choice(self.catalog.targets))
            pool = self.catalog.usable[self.catalog.usable != row]
            rows = rng.choice(pool, size=min(n_nb, len(pool)), replace=False) if n_nb else []
            target = self.catalog.galaxy(row)
            others = [self.catalog.galaxy(int(r)) for r in rows]
        neighbours = []
        for g in others:
            # uniform in area within the annulus [min_separation, max_separation] arcsec
            r = np.sqrt(rng.uniform(blend.min_separation**2, blend.max_separation**2))
            phi = rng.uniform(0.0, 2 * np.pi)
            neighbours.append((g, float(r * np.cos(phi)), float(r * np.sin(phi))))
        return target, neighbours

    # ---- drawing --------------------------------------------------------------------------
    def _profile(self, g: Galaxy, band: int, dx: float = 0.0, dy: float = 0.0):
        """Achromatic profile of galaxy g in config band `band`, fluxes in electrons, or None."""
        galsim = self.galsim
        b6 = self.band_index[band]
        scale = self.e_per_maggie[band]
        parts = []
        fb, fd, fa = g.bulge_maggies[b6] * scale, g.disk_maggies[b6] * scale, g.agn_maggies[b6] * scale
        if fb > 0 and g.hlr_bulge > 0:
            parts.append(galsim.DeVaucouleurs(half_light_radius=g.hlr_bulge, flux=fb).shear(e1=g.e_bulge[0], e2=g.e_bulge[1]))
        if fd > 0 and g.hlr_disk > 0:
            parts.append(galsim.Exponential(half_light_radius=g.hlr_disk, flux=fd).shear(e1=g.e_disk[0], e2=g.e_disk[1]))
        if fa > 0:
            parts.append(galsim.DeltaFunction(flux=fa))
        if not parts:
            return None
        prof = parts[0] if len(parts) == 1 else galsim.Add(parts)
        return prof.shift(dx, dy) if (dx or dy) else prof

    def _draw(self, prof, band: int) -> np.ndarray:
        if prof is None:
            return np.zeros((self.size, self.size), np.float32)
        psf = self.psfs[band]
        obj = prof if psf is None else self.galsim.Convolve(prof, psf)
        img = obj.drawImage(
            nx=self.size, ny=self.size, scale=self.cfg.pixel_scale
        )
        return img.array

    def draw(self, seed: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        """Stamp `index` of the run with `seed`: (image, clean, scene, truth row dict), the stamps (B, H, W).

        clean is the noiseless isolated target, scene the noiseless target + neighbours (the image
        before noise; equal to clean for an isolated galaxy)."""
        galsim = self.galsim
        np_seq, gs_seed = stamp_seeds(seed, index)
        rng = np.random.default_rng(np_seq)
        target, neighbours = self._sample_scene(rng)
        nb_count = len(self.bands)
        clean = np.empty((nb_count, self.size, self.size), np.float32)  # (B, H, W)
        image = np.empty_like(clean)
        scenes = np.empty_like(clean)
        deviate = galsim.BaseDeviate(gs_seed)
        ref_all = None
        for b in range(nb_count):
            clean[b] = self._draw(self._profile(target, b), b)
            scene = clean[b].copy()
            if neighbours:
                profs = [p for p in (self._profile(g, b, dx, dy) for g, dx, dy in neighbours) if p is not None]
                if profs:
                    scene += self._draw(profs[0] if len(profs) == 1 else galsim.Add(profs), b)
            scenes[b] = scene
            if b == self.ref:
                ref_all = scene.copy()
            if self.cfg.noise.mode == "poisson":
                im = galsim.ImageF(scene, scale=self.cfg.pixel_scale)
                im.addNoise(galsim.PoissonNoise(deviate, sky_level=float(self.sky[b])))
                scene = im.array
            image[b] = scene
        return image, clean, scenes, self._truth(target, neighbours, clean[self.ref], ref_all)

    def _truth(self, target: Galaxy, neighbours, ref_clean: np.ndarray, ref_all: np.ndarray) -> dict:
        e1, e2 = target.truth_shape()
        e = np.hypot(e1, e2)
        g_over_e = 1.0 / (1.0 + np.sqrt(1.0 - e**2))  # |g| = |e| / (1 + sqrt(1 - |e|^2))
        mags = target.mags
        t = {"e1": e1, "e2": e2, "g1": e1 * g_over_e, "g2": e2 * g_over_e, "redshift": target.redshift}
        t.update({f"mag_{b}": float(mags[k]) for k, b in enumerate(LSST_BANDS)})
        ref_clean = ref_clean.astype(np.float64)
        sky = self.sky[self.ref]
        # matched-filter S/N of the noiseless isolated target with Poisson variance sky + source
        snr = float(np.sqrt(np.sum(ref_clean**2 / (sky + np.clip(ref_clean, 0, None)))))
        tt = float(np.sum(ref_clean * ref_clean))
        ta = float(np.sum(ref_clean * ref_all))
        t.update(
            hlr=target.hlr(), bulge_frac=target.bulge_frac(), snr=snr, sed_type=target.sed_type,
            catalog_row=target.catalog_row, is_blend=int(bool(neighbours)), n_neighbors=len(neighbours),
            blendedness=(1.0 - tt / ta) if ta > 0 else 0.0,
        )
        for k in range(self.cfg.blend.max_neighbors):
            if k < len(neighbours):
                g, dx, dy = neighbours[k]
                t[f"nb{k}_dx"], t[f"nb{k}_dy"], t[f"nb{k}_mag_i"] = dx, dy, float(g.mags[3])
            else:
                t[f"nb{k}_dx"] = t[f"nb{k}_dy"] = t[f"nb{k}_mag_i"] = float("nan")
        return t
