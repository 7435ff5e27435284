"""`cosmolit fit`: configuration, data, model, accelerator and Lightning Trainer put together.

A fit configuration (configs/cnn.yaml, configs/bnn.yaml, configs/vae.yaml) has four sections::

    model:   the model's own hyper-parameters (ShapeCNNConfig, BayesianShapeCNNConfig, GalaxyVAEConfig)
    data:    DataConfig  (batch size, validation fraction, split seed, workers, streaming)
    trainer: TrainerConfig (epochs, accelerator, devices, precision, seed, early stopping)
    ipu:     IPU options (device iterations, replication, gradient accumulation, ...), used on IPU only
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from cosmolit.config import dump_yaml, from_dict, read_yaml
from cosmolit.errors import UsageError

PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "64-true")


@dataclass
class DataConfig:
    batch_size: int = 32
    val_fraction: float = 0.2
    seed: int = 0
    num_workers: int = 0
    in_memory: Optional[bool] = None
    limit: Optional[int] = None

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {self.val_fraction}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be a positive integer, got {self.limit}")


@dataclass
class TrainerConfig:
    epochs: int = 10
    accelerator: str = "auto"
    devices: int = 1
    precision: str = "32-true"
    seed: int = 0
    early_stopping_patience: Optional[int] = None
    log_every_n_steps: int = 10
    deterministic: bool = False

    def __post_init__(self):
        if self.epochs <= 0:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs}")
        if self.devices <= 0:
            raise ValueError(f"devices must be a positive integer, got {self.devices}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.early_stopping_patience is not None and self.early_stopping_patience <= 0:
            raise ValueError("early_stopping_patience must be a positive integer or null")


@dataclass
class FitConfig:
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ipu: dict = field(default_factory=dict)


def model_config_class(kind: str):
    """`<ModelClass>Config`, the dataclass of a model's own hyper-parameters, from its module."""
    from cosmolit.models import MODEL_KINDS, model_class

    cls = model_class(kind)
    module = importlib.import_module(MODEL_KINDS[kind][0])
    return getattr(module, f"{cls.__name__}Config")


def load_fit_config(kind: str, path: str | Path | None, overrides: dict[str, dict]) -> tuple[FitConfig, Any]:
    """Read a fit config, apply CLI overrides per section, validate every section strictly."""
    raw = read_yaml(path) if path is not None else {}
    where = Path(path).name if path is not None else "config"
    for section, values in overrides.items():
        for key, value in values.items():
            if value is not None:
                sect = raw.setdefault(section, {})
                if not isinstance(sect, dict):
                    raise UsageError(f"{where}.{section}: expected a mapping, got {type(sect).__name__}")
                sect[key] = value
    cfg = from_dict(FitConfig, raw, where)
    model_cfg = from_dict(model_config_class(kind), cfg.model, f"{where}.model")
    return cfg, model_cfg


def _accepted_kwargs(cls, values: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return values
    return {k: v for k, v in values.items() if k in params}


def _provenance_callback(kind: str, seed: int, config_yaml: str):
    """A Callback that stamps cosmolit's metadata into every checkpoint (see cosmolit.checkpoint)."""
    import pytorch_lightning as pl
    import torch

    from cosmolit import __version__

    class ProvenanceCallback(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint["cosmolit"] = {
                "model": kind,
                "class": type(pl_module).__name__,
                "version": __version__,
                "torch": str(torch.__version__),
                "pytorch_lightning": str(pl.__version__),
                "seed": seed,
                "config": config_yaml,
            }

    return ProvenanceCallback()


def _sigterm_checkpoint_callback(path: Path):
    """On SIGTERM (scheduler pre-emption), save last.ckpt after the current step and stop."""
    import pytorch_lightning as pl

    class SigtermCheckpoint(pl.Callback):
        def __init__(self):
            self.requested = False
            self._previous = None

        def on_fit_start(self, trainer, pl_module):
            def handler(signum, frame):
                self.requested = True

            try:
                self._previous = signal.signal(signal.SIGTERM, handler)
            except ValueError:  # not in the main thread
                self._previous = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.requested:
                trainer.save_checkpoint(str(path))
                trainer.should_stop = True
                raise KeyboardInterrupt("SIGTERM: checkpoint saved")

        def on_fit_end(self, trainer, pl_module):
            if self._previous is not None:
                signal.signal(signal.SIGTERM, self._previous)

    return SigtermCheckpoint()


@dataclass
class FitResult:
    out: Path
    checkpoint: Path
    best: Optional[Path]
    last: Path
    logs: Path
    metrics: dict
    accelerator: str


def fit(
    kind: str,
    data: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    overrides: dict[str, dict] | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> FitResult:
    """Train one model end to end; returns where the checkpoints and logs are."""
    cfg, model_cfg = load_fit_config(kind, config, overrides or {})
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    final = out / "model.ckpt"
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {str(out)!r} is a file; give a folder for --out")
    if resume:
        if not last.exists():
            raise UsageError(f"--resume: no checkpoint {str(last)!r} to resume from")
    elif out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"output folder {str(out)!r} is not empty; pass --resume to continue or --force to overwrite")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"folder {str(parent)!r} for the output does not exist")

    from cosmolit.backends import trainer_kwargs
    from cosmolit.data import GalaxyDataModule
    from cosmolit.models import model_class

    targets = list(getattr(model_cfg, "targets", []) or [])
    is_vae = kind == "vae"
    dm = GalaxyDataModule(
        data,
        targets=None if is_vae else targets,
        target_kind="clean" if is_vae else "truth",
        batch_size=cfg.data.batch_size,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.data.seed,
        num_workers=cfg.data.num_workers,
        in_memory=cfg.data.in_memory,
        limit=cfg.data.limit,
    )
    dm.setup("fit")
    info = dm.info
    if dm.train_size < cfg.data.batch_size:
        raise UsageError(
            f"the training split has {dm.train_size} stamps, fewer than one batch of {cfg.data.batch_size}; "
            "use a smaller --batch-size or more data"
        )

    import pytorch_lightning as pl

    trainer_opts = _trainer_options(cfg, echo)
    pl.seed_everything(cfg.trainer.seed, workers=True)
    cls = model_class(kind)
    model_kwargs = dict(dataclasses.asdict(model_cfg))
    model_kwargs.update(
        bands=info.bands,
        stamp=info.height,
        normalisation=list(dm.normalisation),
        provenance=dm.provenance,
        train_size=dm.train_size,
    )
    model = cls(**_accepted_kwargs(cls, model_kwargs))
    if info.height != info.width:
        raise UsageError(f"stamps must be square, got {info.height} x {info.width}")

    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    config_yaml = dump_yaml({"model": dataclasses.asdict(model_cfg), "data": dataclasses.asdict(cfg.data),
                             "trainer": dataclasses.asdict(cfg.trainer), "ipu": cfg.ipu})
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min",
                                    save_last=True, save_top_k=1)
    callbacks = [checkpoint_cb, _provenance_callback(kind, cfg.trainer.seed, config_yaml), _sigterm_checkpoint_callback(last)]
    if cfg.trainer.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val_loss", patience=cfg.trainer.early_stopping_patience))
    loggers = [CSVLogger(str(out), name="logs", version="")]
    try:
        from pytorch_lightning.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(str(out), name="tensorboard", version=""))
    except ImportError:
        pass
    trainer = pl.Trainer(
        max_epochs=cfg.trainer.epochs,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=str(out),
        enable_progress_bar=progress,
        log_every_n_steps=max(1, cfg.trainer.log_every_n_steps),
        deterministic=cfg.trainer.deterministic,
        enable_model_summary=progress,
        **trainer_opts,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=str(last) if resume else None)
    if trainer.interrupted:
        raise KeyboardInterrupt

    best = Path(checkpoint_cb.best_model_path) if checkpoint_cb.best_model_path else None
    if best is not None and best.exists():
        from cosmolit.checkpoint import read_checkpoint

        model.load_state_dict(read_checkpoint(best)["state_dict"])
    if is_vae and hasattr(model, "fit_flow"):
        echo("fitting the latent normalizing flow on encoded training galaxies")
        fit_kwargs = {}
        if getattr(model_cfg, "flow_epochs", None):
            fit_kwargs["epochs"] = model_cfg.flow_epochs
        model.fit_flow(dm, seed=cfg.trainer.seed, **fit_kwargs)
    trainer.save_checkpoint(str(final))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    return FitResult(out=out, checkpoint=final, best=best, last=last, logs=out / "logs",
                     metrics=metrics, accelerator=trainer_opts.get("accelerator", "?"))


def _trainer_options(cfg: FitConfig, echo) -> dict:
    from cosmolit import backends

    ipu_opts = None
    accel = backends.resolve_accelerator(cfg.trainer.accelerator)
    if accel == "ipu":
        ipu_opts = from_dict(backends.IPUOptions, cfg.ipu, "config.ipu")
    return backends.trainer_kwargs(accel, cfg.trainer.devices, cfg.trainer.precision, cfg.trainer.seed,
                                   ipu=ipu_opts, echo=echo)
