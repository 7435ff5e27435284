"""Several devices, really: `cosmolit fit --accelerator cpu --devices 2` runs Lightning's DDP over gloo
in two processes (Lightning starts the second one itself), launched through the SLURM job script
benchmarks/slurm/fit_ddp.sbatch in its local mode (no SLURM_JOB_ID, so no srun)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cosmolit.checkpoint import load_model, read_checkpoint
from cosmolit.cli import app
from cosmolit.data import EpochShuffleSampler, GalaxyDataModule

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "slurm" / "fit_ddp.sbatch"
CONFIG = "model: {filters: [4, 8]}\ndata: {val_fraction: 0.25}\ntrainer: {log_every_n_steps: 1, compile: false}\n"
FIT_ARGS = "--epochs 2 --batch-size 4 --seed 7"
TARGETS = ["e1", "e2", "redshift"]  # the cnn's default targets
BATCH, WORLD, CUT = 4, 2, 6  # CUT: the optimizer step at which rank 0 alone receives SIGTERM
TIMEOUT = 240  # seconds one two-process fit may take on a loaded machine

# A stand-in for the `cosmolit` command: the CLI itself, which also records the training items each
# process's sampler yields (rows-<rank>.jsonl) and, with DDP_TEST_SIGTERM_AT, sends rank 0 (only) a
# SIGTERM at the end of that optimizer step. Lightning starts the second process with this script too.
DRIVER = textwrap.dedent("""
    import json, os, signal, time
    import cosmolit.data as data
    import cosmolit.train as train

    rank = os.environ.get("LOCAL_RANK", "0")
    record, stop_at = os.environ["DDP_TEST_RECORD"], int(os.environ.get("DDP_TEST_SIGTERM_AT", "0"))
    original = data.EpochShuffleSampler.__iter__

    def __iter__(self):
        items = list(original(self))
        with open(os.path.join(record, f"rows-{rank}.jsonl"), "a") as f:
            f.write(json.dumps({"rank": self.rank, "world": self.world, "epoch": self.epoch, "items": items}) + "\\n")
        return iter(items)

    data.EpochShuffleSampler.__iter__ = __iter__
    if stop_at and rank == "0":
        callback = train._run_state_callback

        def patched(*args, **kwargs):
            cb = callback(*args, **kwargs)
            base = type(cb).on_train_batch_end

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.01)
                return base(self, trainer, pl_module, outputs, batch, batch_idx)

            cb.on_train_batch_end = on_train_batch_end.__get__(cb)
            return cb

        train._run_state_callback = patched
    from cosmolit.cli import main
    main()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env: dict, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """Run in a session of its own; whatever is left of it (Lightning's second process) is killed after."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=REPO)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd} ran past {timeout} s:\n{out[-3000:]}")
    deadline, left = time.time() + 60, True
    while left and time.time() < deadline:  # the other rank exits by itself soon after rank 0
        try:
            os.killpg(proc.pid, 0)
            time.sleep(0.2)
        except ProcessLookupError:
            left = False
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"processes of {cmd} were still running 60 s after it exited:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def _script(data: Path, out: Path, config: Path, record: Path, sigterm_at: int = 0) -> subprocess.CompletedProcess:
    """benchmarks/slurm/fit_ddp.sbatch run here (no srun) on cpu with 2 processes, through DRIVER."""
    driver = record / "driver.py"
    driver.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PL_", "LOCAL_RANK", "NODE_RANK"))}
    env.update(DATA=str(data), OUT=str(out), CONFIG=str(config), ACCELERATOR="cpu", DEVICES=str(WORLD),
               COSMOLIT=f"{sys.executable} {driver}", FIT_ARGS=FIT_ARGS, MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", DDP_TEST_RECORD=str(record),
               DDP_TEST_SIGTERM_AT=str(sigterm_at))
    return _run(["bash", str(SCRIPT)], env)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _data_module(data) -> GalaxyDataModule:
    """The data module of the fit above as one process builds it (cnn defaults: augment on, split seed 0)."""
    dm = GalaxyDataModule(data, targets=TARGETS, batch_size=BATCH, val_fraction=0.25, seed=0, augment=True)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, synthetic_small_h5, config):
    """One uninterrupted two-process fit through the job script: (output folder, record folder, output)."""
    base = tmp_path_factory.mktemp("ddp")
    out, record = base / "run", base / "record"
    record.mkdir()
    res = _script(synthetic_small_h5, out, config, record)
    assert res.returncode == 0, res.stdout[-4000:]
    return out, record, res.stdout


def test_sampler_shards_are_disjoint_and_cover_the_order():
    full = list(EpochShuffleSampler(37, seed=3, augment=True).__iter__())
    shards = []
    for rank in range(3):
        s = EpochShuffleSampler(37, seed=3, augment=True)
        s.set_shard(rank, 3)
        assert len(s) == 12
        shards.append(list(s))
    assert [x for trio in zip(*shards) for x in trio] == full[:36]
    with pytest.raises(ValueError, match="rank 3"):
        EpochShuffleSampler(5, 0).set_shard(3, 3)


def test_two_processes_each_train_on_their_own_shard(ddp_run, synthetic_small_h5):
    out, record, stdout = ddp_run
    assert "GLOBAL_RANK: 1" in stdout and stdout.count("accelerator: cpu x2") == 1  # one process speaks
    dm = _data_module(synthetic_small_h5)
    per_rank = dm.train_size // WORLD
    seen = {}
    for rank in range(WORLD):
        for line in (record / f"rows-{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            assert (entry["rank"], entry["world"]) == (rank, WORLD)
            seen[rank, entry["epoch"]] = entry["items"]
    assert sorted(seen) == [(r, e) for r in range(WORLD) for e in range(2)]
    for epoch in range(2):
        one = EpochShuffleSampler(dm.train_size, seed=0, augment=True)
        one.set_epoch(epoch)
        order = list(one)
        shards = [seen[r, epoch] for r in range(WORLD)]
        assert all(len(s) == per_rank for s in shards)
        stamps = [{i // 8 for i in s} for s in shards]  # items encode position * 8 + symmetry
        assert not stamps[0] & stamps[1]
        assert sorted(shards[0] + shards[1]) == sorted(order[:per_rank * WORLD])
    # optimizer steps: each process's shard, not the whole split, per epoch
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 2 * (per_rank // BATCH)


def test_normalisation_and_target_stats_come_from_the_whole_training_split(ddp_run, synthetic_small_h5):
    out, _, _ = ddp_run
    hp = read_checkpoint(out / "model.ckpt")["hyper_parameters"]
    dm = _data_module(synthetic_small_h5)
    assert hp["normalisation"] == dm.normalisation
    assert hp["target_stats"] == dm.target_stats


def _val_losses(net, dm, shard) -> list[float]:
    with torch.no_grad():
        return [float(net.batch_terms(batch)["loss"]) for batch in dm._loader(dm._val, train=False, shard=shard)]


def test_validation_metrics_are_reduced_over_both_processes(ddp_run, synthetic_small_h5):
    out, _, _ = ddp_run
    logged = [float(r["val_loss"]) for r in _rows(out / "logs" / "metrics.csv") if r.get("val_loss")]
    assert len(logged) == 2  # one row per epoch: one process wrote the log
    net, _, _ = load_model(out / "checkpoints" / "last.ckpt")  # the weights the last validation ran with
    net.eval()
    dm = _data_module(synthetic_small_h5)
    losses = [_val_losses(net, dm, (r, WORLD)) for r in range(WORLD)]
    assert sum(map(len, losses)) > len(losses[0])
    everyone, rank0 = np.mean(losses[0] + losses[1]), np.mean(losses[0])
    assert logged[-1] == pytest.approx(everyone, rel=1e-5)
    assert abs(logged[-1] - rank0) > 1e-4 * abs(rank0)  # not rank 0's own mean


def test_one_process_writes_the_checkpoints_and_logs(ddp_run):
    out, _, _ = ddp_run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["hparams.yaml", "metrics.csv"]
    lines = (out / "logs" / "metrics.csv").read_text().splitlines()
    assert "epoch" in lines[0].split(",") and lines.count(lines[0]) == 1  # one header
    steps = [int(r["step"]) for r in _rows(out / "logs" / "metrics.csv") if r.get("train_loss")]
    assert steps == sorted(set(steps)) and len(steps) == read_checkpoint(out / "model.ckpt")["global_step"]
    ranks = read_checkpoint(out / "checkpoints" / "last.ckpt")["cosmolit"]["torch_rng_ranks"]
    assert ranks.shape[0] == WORLD and not torch.equal(ranks[0], ranks[1])  # each process its own numbers


def test_calibration_uses_the_whole_validation_split(ddp_run, synthetic_small_h5):
    from cosmolit.models.targets import calibrate

    out, _, _ = ddp_run
    net, _, _ = load_model(out / "checkpoints" / "best.ckpt")
    dm = _data_module(synthetic_small_h5)
    calibrate(net, dm.full_val_dataloader(), progress=False)
    saved = read_checkpoint(out / "model.ckpt")["state_dict"]
    for name, value in net.state_dict().items():
        if name.startswith("target_transform."):
            assert torch.allclose(saved[name], value, rtol=1e-5, atol=1e-7), name


def test_predict_and_evaluate_of_the_ddp_checkpoint_match_one_device(ddp_run, synthetic_small_h5, tmp_path):
    out, _, _ = ddp_run
    ckpt = out / "model.ckpt"
    runner = CliRunner()
    pred = tmp_path / "pred.h5"
    res = runner.invoke(app, ["predict", "--ckpt", str(ckpt), "--data", str(synthetic_small_h5), "--out", str(pred),
                              "--accelerator", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    import h5py

    with h5py.File(pred, "r") as f:
        mean = np.asarray(f["predictions/mean"])
    with h5py.File(synthetic_small_h5, "r") as f:
        images = torch.from_numpy(np.asarray(f["images"], dtype=np.float32))
    net, _, _ = load_model(ckpt)
    with torch.no_grad():
        direct = net.eval().estimate(images)["mean"].numpy()  # the same weights, one process, no Trainer
    np.testing.assert_allclose(mean, direct, rtol=1e-5, atol=1e-6)
    res = runner.invoke(app, ["evaluate", "--ckpt", str(ckpt), "--data", str(synthetic_small_h5),
                              "--out", str(tmp_path / "eval"), "--accelerator", "cpu", "--no-hsm", "--allow-training-data", "-q"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    with h5py.File(synthetic_small_h5, "r") as f:
        e1 = np.asarray(f["truth/e1"], dtype=np.float64)
    assert metrics["e1"]["rmse"] == pytest.approx(float(np.sqrt(np.mean((direct[:, 0] - e1) ** 2))), rel=1e-4)


def test_sigterm_to_one_process_stops_both_and_the_job_script_resumes(ddp_run, synthetic_small_h5, config, tmp_path):
    full, _, _ = ddp_run
    out, record = tmp_path / "run", tmp_path / "record"
    record.mkdir()
    res = _script(synthetic_small_h5, out, config, record, sigterm_at=CUT)
    assert res.returncode == 143, res.stdout[-4000:]
    assert "--resume" in res.stdout and "Traceback" not in res.stdout
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == CUT
    assert not (out / "model.ckpt").exists()

    res = _script(synthetic_small_h5, out, config, record)  # last.ckpt is there: the script adds --resume
    assert res.returncode == 0, res.stdout[-4000:]
    a, b = (read_checkpoint(run / "checkpoints" / "last.ckpt") for run in (full, out))
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    steps = [int(r["step"]) for r in _rows(out / "logs" / "metrics.csv") if r.get("train_loss")]
    # one log: the rows from before the cut merged back in front of the resumed run's; as on one
    # device (test_resume), the step the signal cut short may have no row, and PL 2.0.9 may leave
    # out the last step of an epoch resumed mid-way
    assert set(range(CUT - 1)) <= set(steps) and steps == sorted(set(steps)) and steps[-1] >= b["global_step"] - 2
