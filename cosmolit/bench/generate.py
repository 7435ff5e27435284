"""`cosmolit bench generate`: time to generate n galaxies with the VAE (latent flow sampling + decoding).

As the study (Arcelin 2021): a warm-up of 100 samples first, then for each n the median of
`repeats` timed calls. With no checkpoint an untrained VAE of the default size is used and its
(untrained) flow is switched on, so that the timed work is the same as a trained model's:
flow sampling (8 MAF layers, sequential over the 32 latent dimensions) then decoding.

Modes: eager (plain calls under torch.no_grad) or static (the whole call for one n captured in
a CUDA graph, cosmolit.backends.static.StaticCall; eager with a one-line message without CUDA).

For a VAE, each row also carries `decode_time`: decoding n latents drawn beforehand, the
decoder alone, which is what the study's TensorFlow decoder timings on a 2-core CPU measure
(paper.md: 2.99 s for 1,000 latents; flow sampling + decoding 4.32 s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cosmolit.errors import UsageError

GEN_MODES = ("eager", "static")


@dataclass
class GenerateBenchConfig:
    """The `generate:` section of configs/bench.yaml."""

    accelerator: str = "cpu"
    n: list[int] = field(default_factory=lambda: [1, 10, 100, 500, 1000, 5000])
    repeats: int = 3
    warmup: int = 100
    mode: str = "eager"
    threads: Optional[int] = None
    seed: int = 0
    ckpt: Optional[str] = None

    def __post_init__(self):
        if not self.n or any(v <= 0 for v in self.n):
            raise ValueError(f"n must be positive integers, got {self.n}")
        if self.repeats <= 0:
            raise ValueError(f"repeats must be a positive integer, got {self.repeats}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.mode not in GEN_MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(GEN_MODES)}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads must be a positive integer, got {self.threads}")


def load_vae(ckpt: Optional[str | Path], device, factory: Optional[Callable] = None):
    """(vae in eval mode on device, description). No ckpt: an untrained default VAE, flow switched on."""
    if factory is not None:
        return factory().eval().to(device), "test model"
    if ckpt is not None:
        from cosmolit.checkpoint import load_model

        vae, _, _ = load_model(ckpt, expected="vae", map_location=str(device))
        if not bool(vae.flow_fitted):
            raise UsageError(f"checkpoint {str(ckpt)!r}: the VAE's latent flow was never fitted; "
                             "generation would skip the flow")
        return vae.eval(), f"checkpoint {ckpt}"
    from cosmolit.models import model_class

    vae = model_class("vae")()
    vae.flow_fitted.fill_(True)  # time the flow as a trained model would use it (timing only)
    return vae.eval().to(device), "untrained default-size VAE (timing only)"


def sampler(vae) -> Callable[[int], "object"]:
    """generate(n) -> (n, C, H, W): flow sampling + decoding, without host synchronisation."""
    import torch

    def generate(n: int):
        with torch.no_grad():
            if hasattr(vae, "sample_latents"):
                return vae.decode(vae.sample_latents(int(n)))  # (n, C, H, W)
            return vae.sample(int(n))

    return generate


def decoder_only(vae, z) -> Callable[[], "object"]:
    """decode() -> (n, C, H, W): the decoder alone on latents z drawn beforehand."""
    import torch

    def decode():
        with torch.no_grad():
            return vae.decode(z)

    return decode


def run_generate_bench(cfg: GenerateBenchConfig, echo: Callable[[str], None] = print, progress: bool = True,
                       factory: Optional[Callable] = None, label: Optional[str] = None) -> dict:
    """Time generation for every n of `cfg`; returns a validated results document (kind 'generate')."""
    import torch

    from cosmolit.backends import resolve_accelerator
    from cosmolit.bench.train import apply_threads

    cfg.accelerator = resolve_accelerator(cfg.accelerator)
    if cfg.accelerator == "ipu":
        raise UsageError("bench generate on ipu: use benchmarks/ipu/run_ipu_bench.py (PopTorch inference model)")
    previous = apply_threads(cfg.threads, None, echo)
    try:
        return _run(cfg, echo, progress, factory, label)
    finally:
        torch.set_num_threads(previous)


def _run(cfg, echo, progress, factory, label) -> dict:
    import time

    import torch

    from cosmolit.backends.static import StaticCall
    from cosmolit.bench.callbacks import images_per_second, summarize, synchronize
    from cosmolit.bench.env import capture_environment
    from cosmolit.bench.results import make_payload
    from cosmolit.bench.train import torch_device
    from cosmolit.config import to_dict
    from cosmolit.progress import progress_bar

    torch.manual_seed(cfg.seed)
    device = torch_device(cfg.accelerator)
    vae, what = load_vae(cfg.ckpt, device, factory)
    generate = sampler(vae)

    def prepare(fn):
        """(callable to time, note): captured in a CUDA graph in static mode, else called once untimed."""
        if cfg.mode == "static":
            call = StaticCall(fn, device=device, echo=echo)
            return call, ("cuda-graph" if call.static else f"eager ({call.reason})")
        fn()  # first call at this size (allocator warm-up), not timed
        return fn, None

    def timed(fn) -> list[float]:
        times = []
        for _ in range(cfg.repeats):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
        return times

    if cfg.warmup:
        generate(cfg.warmup)
        synchronize(device)
    rows = []
    with progress_bar(len(cfg.n), "bench generate", enabled=progress) as advance:
        for n in cfg.n:
            fn, note = prepare(lambda n=n: generate(n))
            stats = summarize(timed(fn))
            row = {"n": int(n), "time": stats, "images_per_second": images_per_second(stats["median"], n),
                   "mode": cfg.mode, "repeats": cfg.repeats}
            line = (f"generate n {n:>5}: {stats['median']:.4f} s (IQR {stats['iqr']:.4f}, {cfg.repeats} repeats), "
                    f"{row['images_per_second']:.1f} img/s")
            if hasattr(vae, "sample_latents"):  # a GalaxyVAE: its latents can be drawn apart from decoding
                decode, _ = prepare(decoder_only(vae, vae.sample_latents(int(n))))
                row["decode_time"] = summarize(timed(decode))
                line += f"; decoding alone {row['decode_time']['median']:.4f} s"
            if note:
                row["note"] = note
            rows.append(row)
            echo(line)
            advance(1)
    env = capture_environment(cfg.accelerator, "32-true", cfg.mode, model=what)
    return make_payload("generate", rows, env, to_dict(cfg), label or f"cosmolit {cfg.accelerator} {cfg.mode}")
