"""Property-based tests of option parsing: any input runs or fails with one clear line, never a traceback.

Each case points at a missing data file or an output that already exists, so runs that parse
cleanly stop at that check before any heavy work; what is tested is the parsing and validation.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cosmolit.cli import app

runner = CliRunner()
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

ints = st.one_of(st.integers(-10**6, 10**6).map(str), st.text(max_size=6))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(str), st.text(max_size=6))
words = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8)


def _check(result):
    out = result.output + (getattr(result, "stderr", "") or "")
    assert "Traceback" not in out, out
    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    assert result.exit_code in (0, 2), (result.exit_code, out)
    if result.exit_code == 2:
        assert out.strip(), "an error must say something"


@SETTINGS
@given(n=ints, seed=ints, frac=floats, k=ints, workers=ints)
def test_simulate_options(tmp_path_factory, n, seed, frac, k, workers):
    out = tmp_path_factory.mktemp("sim") / "exists.h5"
    out.write_text("keep me")
    result = runner.invoke(app, ["simulate", "--n", n, "--seed", seed, "--blend-fraction", frac,
                                 "--max-neighbors", k, "--workers", workers, "--out", str(out), "-q"])
    _check(result)
    assert result.exit_code == 2 and out.read_text() == "keep me"


@SETTINGS
@given(model=words, accel=words, batch=ints, epochs=ints, devices=ints, precision=words)
def test_fit_options(tmp_path_factory, model, accel, batch, epochs, devices, precision):
    out = tmp_path_factory.mktemp("fit") / "run"
    result = runner.invoke(app, ["fit", "--model", model, "--data", "/nonexistent/data.h5", "--accelerator", accel,
                                 "--batch-size", batch, "--epochs", epochs, "--devices", devices,
                                 "--precision", precision, "--out", str(out), "-q"])
    _check(result)
    assert result.exit_code == 2 and not out.exists()


@SETTINGS
@given(sizes=words, steps=ints, model=words)
def test_bench_train_options(tmp_path_factory, sizes, steps, model):
    out = tmp_path_factory.mktemp("bench") / "exists.json"
    out.write_text("{}")
    result = runner.invoke(app, ["bench", "train", "--model", model, "--batch-sizes", sizes, "--steps", steps,
                                 "--out", str(out)])
    _check(result)
    assert result.exit_code == 2 and out.read_text() == "{}"


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
