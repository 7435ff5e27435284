"""LSST-like GalSim simulation of isolated and blended galaxies (galsim imported only when drawing)."""

from cosmolit.sim.config import (BlendConfig, NoiseConfig, PopulationConfig, PSFConfig, SimulationConfig,
                                 load_simulation_config)
from cosmolit.sim.simulate import draw_stamps, merge_files, simulate_to_file

__all__ = [
    "SimulationConfig", "PSFConfig", "NoiseConfig", "PopulationConfig", "BlendConfig",
    "load_simulation_config", "draw_stamps", "simulate_to_file", "merge_files",
]
