"""Bad input, tried systematically: one clear line on stderr, exit 2, no traceback, nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cosmolit.cli import app
from cosmolit.synthetic import write_synthetic_dataset

TINY = "model: {filters: [4, 8]}\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory, synthetic_small_h5):
    """Files every case can use: good data, broken variants, a trained cnn and vae."""
    d = tmp_path_factory.mktemp("bad")
    (d / "tiny.yaml").write_text(TINY)
    (d / "vae.yaml").write_text("model: {filters: [4, 8], latent_dim: 4, flow_layers: 2, flow_hidden: [8], "
                                "flow_epochs: 1}\n")
    (d / "unknown.yaml").write_text("model: {filters: [4, 8], filtres: [1]}\n")
    (d / "wrongtype.yaml").write_text("model: {filters: four}\n")
    (d / "negative.yaml").write_text("data: {val_fraction: -0.5}\n")
    (d / "notyaml.yaml").write_text("model: [unclosed\n")
    (d / "text.h5").write_text("not hdf5\n")
    (d / "existing.h5").write_text("keep me\n")
    (d / "afile.txt").write_text("a regular file\n")
    good = synthetic_small_h5
    with h5py.File(d / "noimages.h5", "w") as f:
        f.create_dataset("stuff", data=np.zeros(3))
    with h5py.File(good) as src:
        images = src["images"][()]
        e1 = src["truth/e1"][()]

    def variant(name, imgs, truth=True, bands="gri"):
        with h5py.File(d / name, "w") as f:
            f.create_dataset("images", data=imgs)
            f.attrs["bands"] = bands
            if truth:
                for t in ("e1", "e2", "redshift"):
                    f.create_dataset(f"truth/{t}", data=np.resize(e1, len(imgs)))

    variant("notruth.h5", images, truth=False)
    variant("intimages.h5", images.astype(np.int32))
    variant("rank3.h5", images[:, 0])
    nan = images.copy()
    nan[3, 1, 5, 5] = np.nan
    variant("nan.h5", nan)
    inf = images.copy()
    inf[7, 0, 1, 1] = np.inf
    variant("inf.h5", inf)
    variant("empty.h5", images[:0])
    write_synthetic_dataset(d / "otherbands.h5", n=16, bands="griz", size=32, seed=1)
    write_synthetic_dataset(d / "otherstamp.h5", n=16, bands="gri", size=48, seed=1)
    for kind, cfg in (("cnn", "tiny.yaml"), ("vae", "vae.yaml")):
        res = CliRunner().invoke(app, ["fit", "--model", kind, "--data", str(good), "--out", str(d / kind),
                                       "--config", str(d / cfg), "-e", "1", "-b", "8", "-a", "cpu", "-q"])
        assert res.exit_code == 0, res.output
    return d, good


def _fit(data, *extra, out="OUT/run"):
    return ["fit", "--model", "cnn", "--data", data, "--out", out, "--config", "D/tiny.yaml", "-e", "1", "-b", "8",
            "-a", "cpu", "-q", *extra]


def _eval(data, ckpt="D/cnn/model.ckpt", *extra):
    return ["evaluate", "--ckpt", ckpt, "--data", data, "--out", "OUT/ev", "--no-hsm", "-q", "-a", "cpu", *extra]


def _pred(data, ckpt="D/cnn/model.ckpt", *extra, out="OUT/p.h5"):
    return ["predict", "--ckpt", ckpt, "--data", data, "--out", out, "-q", "-a", "cpu", *extra]


def _gen(*extra, ckpt="D/vae/model.ckpt", out="OUT/g.h5"):
    return ["generate", "--ckpt", ckpt, "--n", "4", "--out", out, "-q", "-a", "cpu", *extra]


# (id, argv, words the one line must contain). D = fixture folder, G = good data, OUT = empty output folder.
CASES = [
    # missing / not HDF5 / broken files, for every command that reads a dataset
    ("fit-missing", _fit("D/nope.h5"), ["does not exist"]),
    ("fit-not-hdf5", _fit("D/text.h5"), ["not an HDF5"]),
    ("fit-no-images", _fit("D/noimages.h5"), ["images"]),
    ("fit-no-truth", _fit("D/notruth.h5"), ["e1"]),
    ("fit-int-images", _fit("D/intimages.h5"), ["dtype"]),
    ("fit-rank3", _fit("D/rank3.h5"), ["rank"]),
    ("fit-nan", _fit("D/nan.h5"), ["NaN"]),
    ("fit-inf", _fit("D/inf.h5"), ["Inf"]),
    ("fit-empty", _fit("D/empty.h5"), ["empty"]),
    ("fit-unknown-key", _fit("G", "--config", "D/unknown.yaml"), ["filtres"]),
    ("fit-wrong-type", _fit("G", "--config", "D/wrongtype.yaml"), ["filters"]),
    ("fit-negative-yaml", _fit("G", "--config", "D/negative.yaml"), ["val_fraction"]),
    ("fit-bad-yaml", _fit("G", "--config", "D/notyaml.yaml"), ["YAML"]),
    ("fit-missing-config", _fit("G", "--config", "D/none.yaml"), ["does not exist"]),
    ("fit-batch-zero", _fit("G", "-b", "0"), ["--batch-size"]),
    ("fit-epochs-negative", _fit("G", "-e", "-1"), ["--epochs"]),
    ("fit-unknown-accelerator", _fit("G", "-a", "tpu"), ["tpu"]),
    ("fit-unknown-model", ["fit", "--model", "gan", "--data", "G", "--out", "OUT/r"], ["gan"]),
    ("fit-out-not-empty", _fit("G", out="D/cnn"), ["--force"]),
    ("fit-out-under-file", _fit("G", out="D/afile.txt/sub"), ["afile.txt"]),
    ("fit-resume-nothing", _fit("G", "--resume"), ["--resume"]),
    ("evaluate-missing-data", _eval("D/nope.h5"), ["does not exist"]),
    # nan.h5 shares its first and last stamps with the training file: its fingerprint (allowed here)
    ("evaluate-nan", _eval("D/nan.h5", "D/cnn/model.ckpt", "--allow-training-data"), ["NaN"]),
    ("evaluate-other-bands", _eval("D/otherbands.h5"), ["bands"]),
    ("evaluate-other-stamp", _eval("D/otherstamp.h5"), ["32x32"]),
    ("evaluate-missing-ckpt", _eval("G", "D/none.ckpt"), ["does not exist"]),
    ("evaluate-not-ckpt", _eval("G", "D/afile.txt"), ["afile.txt"]),
    ("evaluate-wrong-kind", _eval("G", "D/vae/model.ckpt", "--model", "bnn"), ["vae", "bnn"]),
    ("evaluate-batch-zero", _eval("G", "D/cnn/model.ckpt", "-b", "0"), ["--batch-size"]),
    ("evaluate-accelerator", _eval("G", "D/cnn/model.ckpt", "-a", "ipu"), ["ipu"]),
    ("evaluate-limit-zero", _eval("G", "D/cnn/model.ckpt", "--limit", "0"), ["--limit"]),
    ("evaluate-limit-vae", _eval("G", "D/vae/model.ckpt", "--limit", "5"), ["--limit", "--n-generate"]),
    ("predict-exists", _pred("G", out="D/existing.h5"), ["--force"]),
    ("predict-out-under-file", _pred("G", out="D/afile.txt/p.h5"), ["afile.txt"]),
    ("predict-no-images", _pred("D/noimages.h5"), ["images"]),
    ("predict-inf", _pred("D/inf.h5"), ["Inf"]),
    ("predict-empty", _pred("D/empty.h5"), ["empty"]),
    ("predict-vae", _pred("G", "D/vae/model.ckpt"), ["vae"]),
    ("predict-samples-zero", _pred("G", "D/cnn/model.ckpt", "--samples", "0"), ["--samples"]),
    ("generate-cnn", _gen(ckpt="D/cnn/model.ckpt"), ["cnn", "vae"]),
    ("generate-n-zero", ["generate", "--ckpt", "D/vae/model.ckpt", "--n", "0", "--out", "OUT/g.h5"], ["--n"]),
    ("generate-exists", _gen(out="D/existing.h5"), ["--force"]),
    ("generate-accelerator", _gen("-a", "quantum"), ["quantum"]),
    ("info-missing", ["info", "D/nope.h5"], ["does not exist"]),
    ("info-not-hdf5", ["info", "D/text.h5"], ["not an HDF5"]),
    ("info-truncated-ckpt", ["info", "D/afile.txt.ckpt"], ["afile.txt.ckpt"]),
    ("simulate-n-zero", ["simulate", "--n", "0", "--out", "OUT/s.h5"], ["--n"]),
    ("simulate-exists", ["simulate", "--n", "2", "--out", "D/existing.h5"], ["--force"]),
    ("simulate-unknown-key", ["simulate", "--n", "2", "--out", "OUT/s.h5", "--config", "D/unknown.yaml"], ["model"]),
    ("simulate-out-under-file", ["simulate", "--n", "2", "--out", "D/afile.txt/s.h5"], ["afile.txt"]),
    ("simulate-blend-fraction", ["simulate", "--n", "2", "--out", "OUT/s.h5", "--blend-fraction", "1.5"], ["1.5"]),
    ("simulate-bands", ["simulate", "--n", "2", "--out", "OUT/s.h5", "--bands", "gxq"], ["gxq"]),
    ("merge-missing", ["merge", "OUT/m.h5", "D/nope.h5"], ["does not exist"]),
    ("merge-not-hdf5", ["merge", "OUT/m.h5", "D/text.h5"], ["text.h5"]),
    ("show-missing", ["show", "D/nope.h5", "--out", "OUT/s.png"], ["does not exist"]),
    ("show-n-zero", ["show", "G", "--out", "OUT/s.png", "--n", "0"], ["--n"]),
    ("check-ipu-model", ["check-ipu", "--model", "gan"], ["gan"]),
    ("check-ipu-batch", ["check-ipu", "--model", "cnn", "--batch-size", "0"], ["--batch-size"]),
    ("check-ipu-config", ["check-ipu", "--model", "cnn", "--config", "D/unknown.yaml"], ["filtres"]),
    ("bench-train-batch-sizes", ["bench", "train", "--batch-sizes", "2,x", "--out", "OUT/b.json"], ["--batch-sizes"]),
    ("bench-train-accelerator", ["bench", "train", "--accelerator", "tpu", "--out", "OUT/b.json"], ["tpu"]),
    ("bench-train-exists", ["bench", "train", "--out", "D/existing.h5"], ["--force"]),
    ("bench-generate-n", ["bench", "generate", "--n", "0", "--out", "OUT/b.json"], ["--n"]),
    ("bench-generate-ckpt", ["bench", "generate", "--ckpt", "D/nope.ckpt", "--out", "OUT/b.json"], ["nope.ckpt"]),
    ("bench-plot-missing", ["bench", "plot", "D/nope.json", "--out", "OUT/p.png"], ["nope.json"]),
    ("bench-plot-not-json", ["bench", "plot", "D/text.h5", "--out", "OUT/p.png"], ["text.h5"]),
]


def _snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("argv, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(env, tmp_path, argv, words):
    d, good = env
    (d / "afile.txt.ckpt").write_bytes(b"PK\x03\x04 truncated")
    out = tmp_path / "out"
    out.mkdir()

    def sub(a: str) -> str:
        a = str(a)
        if a == "G":
            return str(good)
        return a.replace("D/", f"{d}/", 1) if a.startswith("D/") else a.replace("OUT/", f"{out}/", 1)

    before = _snapshot(d)
    res = CliRunner().invoke(app, [sub(a) for a in argv])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.strip()]
    assert len(errors) >= 1 and errors[-1].startswith(("cosmolit: error:", "Error", "Usage", "Try")), res.output
    text = res.output
    for w in words:
        assert w in text, (w, text)
    assert list(out.iterdir()) == []  # nothing written
    assert _snapshot(d) == before  # nothing overwritten
