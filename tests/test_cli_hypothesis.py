"""Property-based tests of option parsing: any input runs or fails with one clear line, never a traceback.

Each case knows which of its option values are allowed. A value that is not allowed must stop the
command with exit 2 and an error naming that option; when every value is allowed, the command must
get past its checks: `fit` to its (missing) data file, `simulate` and `bench train` to the point
where the work starts, stubbed here so that nothing heavy runs. So an option value that goes
unchecked makes the test fail.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cosmolit.cli import app

runner = CliRunner()
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

ints = st.one_of(st.integers(-10**6, 10**6).map(str), st.text(max_size=6))
counts = st.one_of(st.integers(1, 10**6).map(str), ints)  # mostly allowed, so that one bad value stands alone
floats = st.one_of(st.floats(0.0, 1.0).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                   st.text(max_size=6))
words = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8)


class Reached(Exception):
    """Raised by a stub where the command's real work would start: every check has passed."""


def _check(result):
    out = result.output + (getattr(result, "stderr", "") or "")
    assert "Traceback" not in out, out
    assert not (result.exception and not isinstance(result.exception, (SystemExit, Reached))), repr(result.exception)
    if result.exit_code == 2:
        assert out.strip(), "an error must say something"
    return out


def _as_int(text):
    try:
        return int(text)  # what click's INT does
    except ValueError:
        return None


def _as_float(text):
    try:
        return float(text)  # what click's FLOAT does
    except ValueError:
        return None


def _error(out):
    """The error text: cosmolit's one line, else click's usage error (its box undone)."""
    lines = [line for line in out.splitlines() if line.startswith("cosmolit: error:")]
    return lines[0] if lines else " ".join(out.replace("\u2502", " ").split())


def _refused(result, out, bad):
    """Exit 2 with an error that names one of the refused options (bad: {option: words that name it})."""
    assert result.exit_code == 2 and not isinstance(result.exception, Reached), (bad, out)
    assert any(word in _error(out) for words in bad.values() for word in words), (bad, out)


@SETTINGS
@given(n=counts, seed=counts, frac=floats, k=counts, workers=counts)
def test_simulate_options(tmp_path_factory, monkeypatch, n, seed, frac, k, workers):
    import cosmolit.sim.simulate as sim_module
    from cosmolit.sim.config import config_from_yaml_text

    def stub_writer(path, n_stamps, *args, attrs, **kwargs):
        raise Reached(n_stamps, attrs)

    monkeypatch.setattr(sim_module, "DatasetWriter", stub_writer)
    folder = tmp_path_factory.mktemp("sim")
    out = folder / "new.h5"
    result = runner.invoke(app, ["simulate", "--n", n, "--seed", seed, "--blend-fraction", frac,
                                 "--max-neighbors", k, "--workers", workers, "--out", str(out), "-q"])
    out_text = _check(result)
    assert not list(folder.iterdir())  # nothing written, whatever the outcome
    ni, si, fi, ki, wi = _as_int(n), _as_int(seed), _as_float(frac), _as_int(k), _as_int(workers)
    bad = {}
    if ni is None or ni <= 0:
        bad["--n"] = ("--n",)
    if si is None or si < 0:
        bad["--seed"] = ("seed",)
    if fi is None or not 0.0 <= fi <= 1.0:
        bad["--blend-fraction"] = ("--blend-fraction", "blend fraction")
    if ki is None or ki < 1:
        bad["--max-neighbors"] = ("--max-neighbors", "max neighbors")
    if wi is None or wi <= 0:
        bad["--workers"] = ("--workers",)
    if bad:
        _refused(result, out_text, bad)
    else:
        assert isinstance(result.exception, Reached), out_text
        n_stamps, attrs = result.exception.args
        cfg = config_from_yaml_text(attrs["config"])
        assert n_stamps == ni and attrs["n_total"] == ni and attrs["seed"] == si
        assert cfg.blend.fraction == fi and cfg.blend.max_neighbors == ki


def test_simulate_keeps_an_existing_output(tmp_path):
    out = tmp_path / "exists.h5"
    out.write_text("keep me")
    result = runner.invoke(app, ["simulate", "--n", "4", "--out", str(out), "-q"])
    assert result.exit_code == 2 and "--force" in result.output and out.read_text() == "keep me"


def _fit_accelerator(accel):
    """What `accel` resolves to here, or None where this machine refuses it."""
    if accel == "cpu" or (accel == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if accel in ("gpu", "auto") and torch.cuda.is_available():
        return "gpu"
    return None


@SETTINGS
@given(model=st.one_of(st.sampled_from(["cnn", "bnn", "vae"]), words),
       accel=st.one_of(st.sampled_from(["auto", "cpu", "gpu"]), words),
       batch=counts, epochs=counts, devices=st.one_of(st.sampled_from(["1", "2"]), st.integers(-10**6, 0).map(str), st.text(max_size=6)),
       precision=st.one_of(st.sampled_from(["32-true", "32", "64-true", "bf16-mixed", "16-mixed"]), words))
def test_fit_options(tmp_path_factory, model, accel, batch, epochs, devices, precision):
    from cosmolit.backends.select import CPU_PRECISIONS, GPU_PRECISIONS

    out = tmp_path_factory.mktemp("fit") / "run"
    result = runner.invoke(app, ["fit", "--model", model, "--data", "/nonexistent/data.h5", "--accelerator", accel,
                                 "--batch-size", batch, "--epochs", epochs, "--devices", devices,
                                 "--precision", precision, "--out", str(out), "-q"])
    out_text = _check(result)
    assert result.exit_code == 2 and not out.exists()
    bi, ei, di = _as_int(batch), _as_int(epochs), _as_int(devices)
    resolved = _fit_accelerator(accel)
    bad = {}
    if model not in ("cnn", "bnn", "vae"):
        bad["--model"] = ("model",)
    if bi is None or bi <= 0:
        bad["--batch-size"] = ("--batch-size",)
    if ei is None or ei <= 0:
        bad["--epochs"] = ("--epochs",)
    if di is None or di <= 0 or (resolved == "gpu" and di > torch.cuda.device_count()):  # cpu: DDP over gloo
        bad["--devices"] = ("--devices",)
    if resolved is None:
        bad["--accelerator"] = ("accelerator",)
    if precision not in (GPU_PRECISIONS if resolved == "gpu" else CPU_PRECISIONS):
        bad["--precision"] = ("precision",)
    if bad:
        _refused(result, out_text, bad)
    else:  # every option passed its check: fit got as far as opening the data
        assert "dataset '/nonexistent/data.h5' does not exist" in _error(out_text), out_text


def _int_list(text):
    """`--batch-sizes` as documented: comma-separated positive integers, or None."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        return None
    return values if values and all(v > 0 for v in values) else None


@SETTINGS
@given(sizes=st.one_of(st.lists(st.integers(-3, 40), max_size=4).map(lambda v: ",".join(map(str, v))), words),
       steps=counts, model=st.one_of(st.sampled_from(["cnn", "bnn", "vae"]), words))
def test_bench_train_options(tmp_path_factory, monkeypatch, sizes, steps, model):
    import cosmolit.bench.train as bench_train

    def stub_run(cfg, **kwargs):
        raise Reached(cfg)

    monkeypatch.setattr(bench_train, "run_train_bench", stub_run)
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "r.json"
    result = runner.invoke(app, ["bench", "train", "--model", model, "--batch-sizes", sizes, "--steps", steps,
                                 "--out", str(out)])
    out_text = _check(result)
    assert not list(folder.iterdir())
    si, parsed = _as_int(steps), _int_list(sizes)
    bad = {}
    if model not in ("cnn", "bnn"):
        bad["--model"] = ("model",)
    if parsed is None:
        bad["--batch-sizes"] = ("--batch-sizes",)
    if si is None or si <= 0:
        bad["--steps"] = ("steps",)
    if bad:
        _refused(result, out_text, bad)
    else:
        assert isinstance(result.exception, Reached), out_text
        cfg = result.exception.args[0]
        assert cfg.model == model and cfg.batch_sizes == parsed and cfg.steps == si


@SETTINGS
@given(text=st.text(max_size=200))
def test_any_yaml_text_as_fit_config(tmp_path_factory, text):
    cfg = tmp_path_factory.mktemp("cfg") / "c.yaml"
    cfg.write_text(text)
    result = runner.invoke(app, ["fit", "--model", "cnn", "--data", "/nonexistent/data.h5", "--config", str(cfg),
                                 "--out", str(cfg.parent / "run"), "-q"])
    _check(result)
    assert result.exit_code == 2


@pytest.mark.parametrize("kind", ["cnn", "bnn", "vae"])
@SETTINGS
@given(data=st.dictionaries(st.sampled_from(["targets", "filters", "prelu", "lr", "loss", "latent_dim",
                                             "prior_scale", "samples", "kl_weight", "bogus"]),
                            st.one_of(st.integers(-3, 300), st.floats(allow_nan=True), words,
                                      st.lists(st.integers(-2, 64), max_size=5), st.none()), max_size=4))
def test_model_sections_validate_or_refuse(kind, data):
    from cosmolit.config import from_dict
    from cosmolit.errors import UsageError
    from cosmolit.train import model_config_class

    try:
        from_dict(model_config_class(kind), data, "model")
    except UsageError as exc:
        assert str(exc) and "\n" not in str(exc)
