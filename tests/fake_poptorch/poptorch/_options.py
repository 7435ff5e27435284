"""TEST DOUBLE: poptorch.Options with the setters cosmolit and Lightning 2.0.9 use, validated like PopTorch."""

from __future__ import annotations


def _positive(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"poptorch.Options.{name} needs a positive integer, got {value!r}")
    return value


class _TrainingOptions:
    def __init__(self):
        self.gradient_accumulation = 1

    def gradientAccumulation(self, n):
        self.gradient_accumulation = _positive(n, "Training.gradientAccumulation")
        return self


class Options:
    """deviceIterations, replicationFactor, Training.gradientAccumulation, randomSeed, useIpuModel,
    setAvailableMemoryProportion, enableExecutableCaching, toDict."""

    def __init__(self):
        self.device_iterations = 1
        self.replication_factor = 1
        self.random_seed = None
        self.use_ipu_model = False
        self.available_memory_proportion = {}
        self.executable_cache_dir = None
        self.Training = _TrainingOptions()

    def deviceIterations(self, n):
        self.device_iterations = _positive(n, "deviceIterations")
        return self

    def replicationFactor(self, n):
        self.replication_factor = _positive(n, "replicationFactor")
        return self

    def randomSeed(self, seed):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"poptorch.Options.randomSeed needs an integer, got {seed!r}")
        self.random_seed = seed
        return self

    def useIpuModel(self, use=True):
        self.use_ipu_model = bool(use)
        return self

    def setAvailableMemoryProportion(self, proportions):
        if not isinstance(proportions, dict) or not all(
            isinstance(k, str) and k.startswith("IPU") and 0.0 < float(v) <= 1.0 for k, v in proportions.items()
        ):
            raise ValueError(f"setAvailableMemoryProportion needs {{'IPU0': fraction in (0, 1]}}, got {proportions!r}")
        self.available_memory_proportion = dict(proportions)
        return self

    def enableExecutableCaching(self, path):
        self.executable_cache_dir = str(path)
        return self

    def toDict(self):
        return {
            "device_iterations": self.device_iterations,
            "replication_factor": self.replication_factor,
            "gradient_accumulation": self.Training.gradient_accumulation,
            "random_seed": self.random_seed,
            "use_ipu_model": self.use_ipu_model,
            "available_memory_proportion": dict(self.available_memory_proportion),
            "executable_cache_dir": self.executable_cache_dir,
        }
