"""`cosmolit fit`: configuration, data, model, accelerator and Lightning Trainer put together.

A fit configuration (configs/cnn.yaml, configs/bnn.yaml, configs/vae.yaml) has four sections::

    model:   the model's own hyper-parameters (ShapeCNNConfig, BayesianShapeCNNConfig, GalaxyVAEConfig)
    data:    DataConfig  (batch size, validation fraction, split seed, workers, streaming)
    trainer: TrainerConfig (epochs, accelerator, devices, nodes, precision, seed, early stopping,
             compile, static-graph mode, device iterations)
    ipu:     IPU options (replication, gradient accumulation, ...), used on IPU only
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from cosmolit.config import accepted_kwargs, dump_yaml, from_dict, read_yaml
from cosmolit.errors import CosmolitError, UsageError

PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "64-true")


@dataclass
class DataConfig:
    batch_size: int = 32
    val_fraction: float = 0.2
    seed: int = 0
    num_workers: int = 0
    in_memory: Optional[bool] = None
    limit: Optional[int] = None
    augment: bool = True  # grid-symmetry augmentation of training stamps (cosmolit.data)
    renoise: bool = False  # fresh noise on the noiseless scenes every epoch (needs `simulate --scene`)

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
    # machines of a DDP run (devices processes on each); null: SLURM's node count under srun, else 1
    num_nodes: Optional[int] = None
    precision: str = "32-true"
    seed: int = 0
    early_stopping_patience: Optional[int] = None
    log_every_n_steps: int = 10
    deterministic: bool = False
    checkpoint_every_n_steps: Optional[int] = None
    # torch.compile the network of the training steps (cosmolit.backends.compiling): true, false, or
    # auto (on for cpu and gpu, off on an IPU, where PopTorch compiles the step itself)
    compile: Union[bool, str] = False
    # the whole training step captured in a CUDA graph (cosmolit.backends.static): true, false, or
    # auto (on for one GPU at 32-true precision with a constant learning rate, off elsewhere)
    static_graph: Union[bool, str] = "auto"
    # optimizer steps per Lightning step (one host call): on an IPU (PopTorch device iterations) and
    # in static-graph mode; each training batch then holds device_iterations x batch_size stamps
    device_iterations: int = 1

    def __post_init__(self):
        if self.epochs <= 0:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs}")
        if self.devices <= 0:
            raise ValueError(f"devices must be a positive integer, got {self.devices}")
        if self.num_nodes is not None and (isinstance(self.num_nodes, bool) or self.num_nodes <= 0):
            raise ValueError(f"num_nodes must be a positive integer or null, got {self.num_nodes}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.early_stopping_patience is not None and self.early_stopping_patience <= 0:
            raise ValueError("early_stopping_patience must be a positive integer or null")
        if self.checkpoint_every_n_steps is not None and self.checkpoint_every_n_steps <= 0:
            raise ValueError("checkpoint_every_n_steps must be a positive integer or null")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"compile must be true, false or auto, got {self.compile!r}")
        if self.static_graph not in (True, False, "auto"):
            raise ValueError(f"static_graph must be true, false or auto, got {self.static_graph!r}")
        if isinstance(self.device_iterations, bool) or self.device_iterations <= 0:
            raise ValueError(f"device_iterations must be a positive integer, got {self.device_iterations}")
        if self.log_every_n_steps <= 0:
            raise ValueError(f"log_every_n_steps must be a positive integer, got {self.log_every_n_steps}")


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


# Per model, the data and trainer settings that configs/<kind>.yaml holds and the documented quality
# was measured with, so that a fit without --config trains as the presets do (the model sections'
# own defaults are those of the presets already); a config file or the command line overrides them.
KIND_DEFAULTS = {
    "cnn": {"trainer": {"epochs": 30}},
    "bnn": {"data": {"batch_size": 8}, "trainer": {"epochs": 100}},
    "vae": {"trainer": {"epochs": 24}},
}


def load_fit_config(kind: str, path: str | Path | None, overrides: dict[str, dict]) -> tuple[FitConfig, Any]:
    """Read a fit config over the model's KIND_DEFAULTS, apply CLI overrides per section, validate
    every section strictly."""
    raw = read_yaml(path) if path is not None else {}
    where = Path(path).name if path is not None else "config"
    for section, values in KIND_DEFAULTS.get(kind, {}).items():
        sect = raw.setdefault(section, {})
        if isinstance(sect, dict):  # anything else is refused below, in from_dict
            for key, value in values.items():
                sect.setdefault(key, value)
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




def _provenance_callback(kind: str, seed: int, config_yaml: str):
    """A Callback that stamps cosmolit's metadata into every checkpoint (see cosmolit.checkpoint)."""
    import pytorch_lightning as pl
    import torch

    from cosmolit import __version__

    class ProvenanceCallback(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint.setdefault("cosmolit", {}).update({
                "model": kind,
                "class": type(pl_module).__name__,
                "version": __version__,
                "torch": str(torch.__version__),
                "pytorch_lightning": str(pl.__version__),
                "seed": seed,
                "config": config_yaml,
            })

    return ProvenanceCallback()


class Preempted(CosmolitError):
    """`cosmolit fit` stopped by SIGTERM or Ctrl-C after saving last.ckpt (exit 143 / 130)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def _run_state_callback(path: Path, every_n_steps: Optional[int] = None, restore: Optional[dict] = None,
                        seed: int = 0):
    """Everything a run needs to survive interruption, as one Callback.

    - counts the batches done in the current epoch and stores them (with the torch RNG state)
      in every checkpoint, so that a resume skips exactly those batches and draws the same
      random numbers (VAE reparameterisation, BNN weight samples);
    - in a DDP run (several processes) each process draws its own random numbers, from
      (seed, rank), and every checkpoint holds the RNG state of each rank;
    - on SIGTERM (scheduler pre-emption) or SIGINT (Ctrl-C): finish the current step, save
      last.ckpt atomically and stop with Preempted (exit 143 / 130); in a DDP run a signal to any
      one process stops them all at the same step;
    - with `every_n_steps`, also saves last.ckpt every that many optimizer steps (SIGKILL loses
      at most that many steps);
    - saves last.ckpt at the end of every epoch. ModelCheckpoint keeps only the best one: since
      pytorch-lightning 2.6 its own `save_last` writes last.ckpt only in an epoch that also wrote a
      best checkpoint, so a run whose validation stopped improving would resume from its best
      epoch instead of its last (2.0 wrote it every epoch).
    """
    import pytorch_lightning as pl
    import torch

    class RunState(pl.Callback):
        def __init__(self):
            self.signum: Optional[int] = None
            self.batches = 0
            self._previous: dict = {}
            self._restore = restore
            self._saved_at = -1

        def _catch_signals(self):
            # from on_train_start: Lightning installs its own SIGTERM handler after on_fit_start, one
            # that in a DDP run signals the other processes and broadcasts from inside the handler,
            # which hangs them; during training this one replaces it (and Lightning restores its own)
            def handler(signum, frame):
                if self.signum is not None and signum == signal.SIGINT:
                    raise KeyboardInterrupt  # a second Ctrl-C stops at once
                self.signum = signum

            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._previous[sig] = signal.signal(sig, handler)
                except ValueError:  # not in the main thread: leave signals alone
                    pass

        def _reset_signals(self):
            for sig, prev in self._previous.items():
                signal.signal(sig, prev)
            self._previous = {}

        def on_train_start(self, trainer, pl_module):
            self._catch_signals()
            if trainer.world_size > 1 and self._restore is None:  # the ranks' own random numbers
                torch.manual_seed(_rank_seed(seed, trainer.global_rank))

        def on_train_epoch_start(self, trainer, pl_module):
            if self._restore is None:
                self.batches = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self._restore is not None:
                self.batches = int(self._restore.get("batches_in_epoch", 0))
                ranks = self._restore.get("torch_rng_ranks")
                rng = self._restore.get("torch_rng") if trainer.world_size == 1 else None
                if isinstance(ranks, torch.Tensor) and len(ranks) == trainer.world_size:
                    rng = ranks[trainer.global_rank]
                if isinstance(rng, torch.Tensor):
                    torch.set_rng_state(rng.to(torch.uint8).cpu().clone())  # a row of its own: torch misreads a view
                elif trainer.world_size > 1:  # resumed with another number of processes
                    torch.manual_seed(_rank_seed(seed, trainer.global_rank, trainer.global_step))
                self._restore = None

        def _save_last(self, trainer):
            trainer.save_checkpoint(str(path), weights_only=False)
            self._saved_at = trainer.global_step

        def _signal_anywhere(self, trainer, pl_module) -> Optional[int]:
            """The signal received by this process or, in a DDP run, by any of them (one all-reduce)."""
            if trainer.world_size == 1:
                return self.signum
            got = torch.tensor(float(self.signum or 0), device=pl_module.device)
            got = int(trainer.strategy.reduce(got, reduce_op="max").item())
            return got or None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches += 1
            signum = self._signal_anywhere(trainer, pl_module)
            if signum is not None:
                self.signum = signum
                self._save_last(trainer)
                name = "SIGTERM" if self.signum == signal.SIGTERM else "SIGINT (Ctrl-C)"
                raise Preempted(
                    f"stopped by {name} at epoch {trainer.current_epoch}, step {trainer.global_step}; saved "
                    f"{str(path)!r}; continue with the same command and --resume", self.signum)
            if every_n_steps and trainer.global_step % every_n_steps == 0:
                self._save_last(trainer)

        def on_train_epoch_end(self, trainer, pl_module):
            if self._saved_at != trainer.global_step:  # not just saved by every_n_steps
                self._save_last(trainer)

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            meta = checkpoint.setdefault("cosmolit", {})
            meta["batches_in_epoch"] = self.batches
            meta["torch_rng"] = torch.get_rng_state()
            if trainer.world_size > 1:  # every process calls this hook: (world, state) from all of them
                state = torch.get_rng_state()
                rows = torch.zeros(trainer.world_size, len(state), dtype=torch.int32, device=pl_module.device)
                rows[trainer.global_rank] = state.to(rows)
                rows = trainer.strategy.reduce(rows, reduce_op="sum")  # each row is one rank's
                meta["torch_rng_ranks"] = rows.cpu().to(torch.uint8)

        def on_train_end(self, trainer, pl_module):
            self._reset_signals()

        def on_fit_end(self, trainer, pl_module):
            self._reset_signals()

        def on_exception(self, trainer, pl_module, exception):
            self._reset_signals()

    return RunState()


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A torch seed of its own for each DDP process (and, after a resume with another number of
    processes, for each step it resumes at)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1)[0])


@dataclass
class FitResult:
    out: Path
    checkpoint: Path
    best: Optional[Path]
    last: Path
    logs: Path
    metrics: dict
    accelerator: str


# pytorch-lightning 2.6 calls a torch pytree check that torch 2.13 deprecates, and the warning
# repeats at every fit: about the two libraries' versions, nothing the user can act on
LIBRARY_NOISE = r".*isinstance\(treespec, LeafSpec\).*"


# what Lightning says when a run resumes into its own output folder, and cosmolit handles: the
# CSV logger's "previous log files ... will be deleted" (fit merges them back) and ModelCheckpoint's
# "directory exists and is not empty"
RESUME_NOISE = r"(Experiment logs|Checkpoint) directory .* exists and is not empty.*"


@contextlib.contextmanager
def library_noise_filtered(resume: bool = False):
    """Leave out the warnings in LIBRARY_NOISE, and with `resume` those in RESUME_NOISE (and
    nothing else) inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LIBRARY_NOISE)
        if resume:
            warnings.filterwarnings("ignore", message=RESUME_NOISE)
        yield


def _read_csv_rows(path: Path) -> list[dict]:
    """Rows of a CSV file as dicts; [] when there is none."""
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _merge_resumed_log(path: Path, earlier: list[dict]) -> None:
    """Put the rows logged before a resume back in front of the resumed run's metrics.csv (the
    CSV logger rewrites the file from scratch), keeping of the earlier rows those before the first
    step the resumed run logged; one file with every epoch, written atomically."""
    import csv

    from cosmolit.dataset import atomic_path

    def step(row):
        try:
            return int(float(row.get("step") or ""))
        except ValueError:
            return None

    later = _read_csv_rows(path)
    first = min((s for s in map(step, later) if s is not None), default=None)
    kept = [r for r in earlier if first is None or (step(r) is not None and step(r) < first)]
    fields = list(dict.fromkeys(k for row in (*later, *kept) for k in row))  # the new header first
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept + later)


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
    resume_state, resumed_hparams = None, {}
    if resume:
        if not last.exists():
            raise UsageError(f"--resume: no checkpoint {str(last)!r} to resume from")
        from cosmolit.checkpoint import checkpoint_kind, read_checkpoint

        # Validate (weights_only) before Lightning touches the file; Lightning then loads it
        # again through safe_checkpoint_io(), weights_only as well.
        previous = read_checkpoint(last)
        previous_kind = checkpoint_kind(previous, last)
        if previous_kind != kind:
            raise UsageError(f"--resume: {str(last)!r} holds a {previous_kind} model, not a {kind} model")
        resume_state = dict(previous.get("cosmolit") or {})
        resumed_hparams = dict(previous.get("hyper_parameters") or {})
        del previous
    elif out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"output folder {str(out)!r} is not empty; pass --resume to continue or --force to overwrite")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"folder {str(parent)!r} for the output does not exist")
    if not parent.is_dir():
        raise UsageError(f"{str(parent)!r} is a file, not a folder; --out must be under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"folder {str(parent)!r} for the output is not writable")

    import pytorch_lightning as pl
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from cosmolit.data import GalaxyDataModule
    from cosmolit.models import model_class

    if rank_zero_only.rank != 0:  # the other processes of a DDP run (Lightning reads the rank from the environment)
        echo, progress = (lambda *_: None), False
    trainer_opts, ipu_batches = _trainer_options(cfg, echo)
    accel = trainer_opts.get("accelerator")
    # processes of a DDP run (the IPU's replicas live in one process)
    world = 1 if accel == "ipu" else int(trainer_opts["devices"]) * int(trainer_opts.get("num_nodes", 1))
    static_k = _static_graph_steps(cfg, accel, getattr(model_cfg, "lr_schedule", "constant"), echo)
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
        augment=cfg.data.augment,
        renoise=cfg.data.renoise,
        inputs="clean" if getattr(model_cfg, "inputs", "noisy") == "clean" else "images",
        batches_per_step=max(static_k, 1),
    )
    dm.setup("fit")
    info = dm.info
    if info.height != info.width:
        raise UsageError(f"stamps must be square, got {info.height} x {info.width}")
    # stamps one Lightning step takes: K batches in static-graph mode; on an IPU PopTorch's loader
    # takes device_iterations x replicas x gradient_accumulation batches
    batches = max(static_k, 1) * ipu_batches
    step_stamps = batches * cfg.data.batch_size
    if dm.train_size // world < step_stamps:
        step = f"{step_stamps} ({batches} x {cfg.data.batch_size})" if batches > 1 else str(cfg.data.batch_size)
        each = f" ({dm.train_size // world} for each of {world} processes)" if world > 1 else ""
        raise UsageError(
            f"the training split has {dm.train_size} stamps{each}, fewer than the {step} one training step takes; "
            "use a smaller --batch-size" + (" or device_iterations" if batches > 1 else "") + " or more data"
        )
    if dm.val_size < world:
        raise UsageError(f"the validation split has {dm.val_size} stamps, fewer than the {world} processes that "
                         "share it; use a larger val_fraction, more data or fewer --devices")
    pl.seed_everything(cfg.trainer.seed, workers=True)
    cls = model_class(kind)
    model_kwargs = dict(dataclasses.asdict(model_cfg))
    model_kwargs.update(
        bands=info.bands,
        stamp=info.height,
        normalisation=list(dm.normalisation),
        provenance=dm.provenance,
        train_size=dm.train_size,
        target_stats=None if is_vae else dm.target_stats,
    )
    new_data = bool(resumed_hparams) and _keep_resumed_scales(model_kwargs, resumed_hparams, info, echo)
    model = cls(**accepted_kwargs(cls, model_kwargs))
    if cfg.trainer.compile:
        if accel == "ipu" and cfg.trainer.compile is True:
            raise UsageError("trainer.compile is for cpu and gpu; on an IPU PopTorch compiles the step itself "
                             "(use compile: auto or false)")
        if accel == "gpu" and static_k and cfg.trainer.compile is True:
            raise UsageError("trainer.compile and static-graph mode exclude each other on a GPU (the whole step is "
                             "one CUDA graph); use compile: auto or false, or static_graph: false")
        if accel == "ipu":
            echo("compile: auto is off on the IPU (PopTorch compiles the step itself)")
        elif accel == "gpu" and static_k:
            echo("compile: auto is off in static-graph mode (the whole step is one CUDA graph)")
        else:
            model.compile_network(True, echo)
            if model.compile_status() == "on":
                echo("torch.compile: the first training and validation steps compile the network (about a minute)")
    if static_k:
        if accel == "gpu":
            echo(f"static graph: each training step (forward, loss, backward, Adam) is captured in a CUDA graph, "
                 f"{static_k} optimizer step{'s' if static_k > 1 else ''} per replay")
        model.enable_static_graph(static_k, echo)

    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    config_yaml = dump_yaml({"model": dataclasses.asdict(model_cfg), "data": dataclasses.asdict(cfg.data),
                             "trainer": dataclasses.asdict(cfg.trainer), "ipu": cfg.ipu})
    out.mkdir(parents=True, exist_ok=True)
    # the metric that picks best.ckpt and stops early: the model's choice, except on the IPU,
    # where only the loss leaves the compiled step
    monitor = "val_loss" if accel == "ipu" else model.monitor
    checkpoint_cb = ModelCheckpoint(dirpath=str(ckpt_dir),  # a str: a Path would make the checkpoint unsafe to load on PL 2.0.9
                                    filename="best", monitor=monitor, mode="min",
                                    save_last=False, save_top_k=1)  # last.ckpt: _run_state_callback
    sampler = dm.train_sampler
    if resume_state is not None:
        done = int(resume_state.get("batches_in_epoch", 0) or 0)
        per_epoch = dm.train_size // world // step_stamps  # per process
        sampler.skip = done * step_stamps if 0 < done < per_epoch else 0
        resume_state["batches_in_epoch"] = done if 0 < done < per_epoch else 0
    run_state = _run_state_callback(last, cfg.trainer.checkpoint_every_n_steps, restore=resume_state,
                                    seed=cfg.trainer.seed)
    callbacks = [checkpoint_cb, _provenance_callback(kind, cfg.trainer.seed, config_yaml), run_state]
    if new_data:
        callbacks.append(_forget_best_callback(checkpoint_cb))
    if cfg.trainer.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor=monitor, patience=cfg.trainer.early_stopping_patience))
    if getattr(model_cfg, "lr_schedule", "constant") != "constant":  # the learning rate of each epoch, in metrics.csv
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    loggers = [CSVLogger(str(out), name="logs", version="")]
    try:
        from pytorch_lightning.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(str(out), name="tensorboard", version=""))
    except ImportError:
        pass
    from cosmolit.checkpoint import safe_checkpoint_io

    if "plugins" not in trainer_opts:
        trainer_opts = dict(trainer_opts, plugins=[safe_checkpoint_io()])
    if world > 1:  # the data module gives each process its shard itself (cosmolit.data)
        trainer_opts = dict(trainer_opts, use_distributed_sampler=False)
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
    metrics_csv = out / "logs" / "metrics.csv"
    earlier_rows = _read_csv_rows(metrics_csv) if resume else []  # the CSV logger starts the file afresh
    try:
        with library_noise_filtered(resume):
            trainer.fit(model, datamodule=dm, ckpt_path=str(last) if resume else None)
    finally:
        model.compile_network(False)  # calibration and prediction below run eager (other shapes, no grad)
        model.disable_static_graph()
        dm.sharded = False  # below, every process calibrates (or fits the flow) on the whole split
        if earlier_rows and trainer.is_global_zero:
            _merge_resumed_log(metrics_csv, earlier_rows)
    if trainer.interrupted:
        raise KeyboardInterrupt

    best = Path(checkpoint_cb.best_model_path) if checkpoint_cb.best_model_path else None
    if best is not None and best.exists():
        from cosmolit.checkpoint import read_checkpoint

        model.load_state_dict(read_checkpoint(best)["state_dict"])
    if is_vae:
        echo("fitting the latent normalizing flow on encoded training galaxies")
        model.fit_flow(dm, seed=cfg.trainer.seed)  # flow_epochs etc. come from the model's hyper-parameters
    else:
        from cosmolit.models.targets import calibrate

        found = calibrate(model, dm.full_val_dataloader(), echo=echo, progress=progress)
        for name, r in found["response"].items():
            echo(f"{name}: response on the validation split 1 + m = {r['slope']:.4f}, c = {r['intercept']:+.5f}; "
                 "removed from predictions")
        echo("uncertainty calibration on the validation split, factor on sigma: "
             + ", ".join(f"{name} {v:.3f}" for name, v in found["sigma_scale"].items()))
    trainer.save_checkpoint(str(final), weights_only=False)  # full state; explicit, or PL 2.6 logs a line
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    return FitResult(out=out, checkpoint=final, best=best, last=last, logs=out / "logs",
                     metrics=metrics, accelerator=trainer_opts.get("accelerator", "?"))


def _keep_resumed_scales(model_kwargs: dict, previous: dict, info, echo) -> bool:
    """A resumed run continues the checkpoint's network, so it keeps the input normalisation and
    target statistics that network was trained with, whatever --data now holds (the same file gives
    the same values; another one, such as new stamps for more training, would give slightly others).
    Another band set or stamp size cannot continue those weights: one line, UsageError. Returns
    whether the run resumes on another dataset than the checkpoint's."""
    bands, stamp = previous.get("bands"), previous.get("stamp")
    if bands is not None and (str(bands) != info.bands or int(stamp) != info.height):
        raise UsageError(f"--resume: the checkpoint was trained on bands {bands!r} and {stamp}x{stamp} stamps, "
                         f"but {info.path!r} has bands {info.bands!r} and {info.height}x{info.width} stamps")
    for key in ("normalisation", "target_stats"):
        if previous.get(key) is not None:
            model_kwargs[key] = previous[key]
    before = (previous.get("provenance") or {}).get("path")
    now = model_kwargs.get("provenance", {}).get("path")
    if before and now and before != now:
        echo(f"resuming on {now} (the checkpoint trained on {before}); keeping the checkpoint's input "
             "normalisation and target statistics; best.ckpt restarts with this dataset's validation")
        return True
    return False


def _forget_best_callback(checkpoint_cb):
    """A Callback for a run resumed on another dataset: the restored best validation score was
    measured on other stamps, so the first epoch on the new ones replaces best.ckpt in place and
    later ones compete with it. (Without a restored state, or with a copied output folder whose
    state names the old folder, ModelCheckpoint would write best-v1.ckpt beside the old best.)"""
    import pytorch_lightning as pl
    import torch

    class ForgetBest(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # after Lightning restored the callbacks' state
            cb, worst = checkpoint_cb, torch.tensor(float("inf"))
            path = cb.format_checkpoint_name({})  # OUT/checkpoints/best.ckpt
            cb.best_k_models = {path: worst}
            cb.best_model_path = cb.kth_best_model_path = path
            cb.best_model_score = cb.kth_value = worst

    return ForgetBest()


def _static_graph_steps(cfg: FitConfig, accel: str, lr_schedule: str, echo) -> int:
    """Optimizer steps per Lightning step in static-graph mode (cosmolit.backends.static), 0 when off.

    auto: on for one GPU at 32-true precision with a constant learning rate (CUDA graphs take the
    per-step launch and Python overhead out of the small steps of these networks), off on a CPU and on
    an IPU (where PopTorch runs every step as one static graph itself). true on a CPU trains eager
    steps after one line saying so (the code path of a GPU, without the capture)."""
    t = cfg.trainer
    if accel == "ipu":
        if t.static_graph is True:
            raise UsageError("static_graph is for gpu; on an IPU PopTorch runs every step as one static graph "
                             "itself (use static_graph: auto or false)")
        return 0
    on = t.static_graph is True or (t.static_graph == "auto" and accel == "gpu")
    conflicts = [what for what, bad in ((f"devices {t.devices} (one GPU only)", t.devices > 1),
                                        (f"precision {t.precision} (32-true only)", t.precision not in ("32-true", "32")),
                                        (f"lr_schedule {lr_schedule} (constant only)", lr_schedule != "constant"))
                 if bad]
    if on and conflicts:
        if t.static_graph is True:
            raise UsageError("static_graph: true does not go with " + "; ".join(conflicts))
        echo("static_graph: auto is off here: " + "; ".join(conflicts))
        on = False
    if not on and t.device_iterations > 1:
        raise UsageError(f"device_iterations {t.device_iterations} needs an IPU or static-graph mode (a CUDA GPU, or "
                         "static_graph: true); use device_iterations: 1")
    return t.device_iterations if on else 0


def _trainer_options(cfg: FitConfig, echo) -> tuple[dict, int]:
    """pl.Trainer keyword arguments, and the batches one Lightning step takes on an IPU (device
    iterations x replicas x gradient accumulation; 1 elsewhere)."""
    from cosmolit import backends

    ipu_opts = None
    accel = backends.resolve_accelerator(cfg.trainer.accelerator)
    if accel == "ipu":
        ipu = dict(cfg.ipu)
        k = cfg.trainer.device_iterations
        if k != 1 and ipu.get("device_iterations", 1) not in (1, k):
            raise UsageError(f"device_iterations is given twice ({k} in trainer, {ipu['device_iterations']} in ipu); "
                             "keep trainer.device_iterations")
        if k != 1:
            ipu["device_iterations"] = k
        ipu_opts = from_dict(backends.IPUOptions, ipu, "config.ipu")
    opts = backends.trainer_kwargs(accel, cfg.trainer.devices, cfg.trainer.precision, cfg.trainer.seed,
                                   ipu=ipu_opts, echo=echo)
    if accel != "ipu":
        from cosmolit.backends.select import num_nodes

        nodes = num_nodes(cfg.trainer.num_nodes)
        if nodes > 1:
            echo(f"{nodes} nodes x {opts['devices']} device(s): {nodes * opts['devices']} DDP processes")
            opts = dict(opts, num_nodes=nodes, strategy="ddp")
        return opts, 1
    return opts, ipu_opts.device_iterations * ipu_opts.gradient_accumulation * int(opts["devices"])
