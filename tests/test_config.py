from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosmolit.config import dump_yaml, from_dict, load_config, read_yaml
from cosmolit.errors import UsageError


@dataclass
class Inner:
    width: int = 4
    scale: float = 1.0


@dataclass
class Schema:
    name: str = "x"
    n: int = 3
    ratio: float = 0.5
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    sizes: tuple = (1, 2)
    maybe: Optional[int] = None
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.n <= 0:
            raise ValueError(f"n must be positive, got {self.n}")


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("n: 7\ninner:\n  width: 9\n")
    cfg = load_config(p, Schema, overrides={"ratio": 2, "name": None})
    assert cfg.n == 7 and cfg.inner.width == 9 and cfg.ratio == 2.0 and cfg.name == "x"
    assert isinstance(cfg.ratio, float)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("nn: 3\n", "unknown key 'nn'"),
        ("n: three\n", "expected an integer"),
        ("n: 1.5\n", "expected an integer"),
        ("flag: 1\n", "expected true or false"),
        ("mode: c\n", "not allowed"),
        ("inner: 3\n", "expected a mapping"),
        ("inner:\n  depth: 2\n", "unknown key 'depth'"),
        ("n: -1\n", "n must be positive"),
        ("- a\n- b\n", "must hold a mapping"),
        ("n: [1\n", "not valid YAML"),
    ],
)
def test_bad_configs_give_one_line(tmp_path, text, fragment):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(UsageError) as exc:
        load_config(p, Schema)
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_file():
    with pytest.raises(UsageError, match="does not exist"):
        read_yaml("/nonexistent/config.yaml")


def test_dump_round_trip():
    cfg = Schema(n=5, inner=Inner(width=2))
    import yaml

    again = from_dict(Schema, yaml.safe_load(dump_yaml(cfg)))
    assert again.n == 5 and again.inner.width == 2 and tuple(again.sizes) == (1, 2)


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "n", "ratio", "flag", "mode", "sizes", "maybe", "inner", "bogus"]),
                       yaml_values, max_size=5))
def test_any_mapping_builds_or_fails_cleanly(data):
    try:
        cfg = from_dict(Schema, data)
    except UsageError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(cfg.n, int) and cfg.n > 0


@pytest.mark.parametrize("kind, name", [("cnn", "cnn.yaml"), ("cnn", "cnn_blends.yaml"), ("bnn", "bnn.yaml"),
                                        ("vae", "vae.yaml"), ("vae", "vae_clean.yaml")])
def test_fit_presets_load_and_compile_where_it_pays(kind, name):
    from pathlib import Path

    from cosmolit.train import load_fit_config

    cfg, model_cfg = load_fit_config(kind, Path(__file__).resolve().parents[1] / "configs" / name, {})
    assert cfg.trainer.compile == "auto"  # on for cpu and gpu, off on an IPU
    assert model_cfg.lr > 0


def _sections(kind, path):
    import dataclasses

    from cosmolit.train import load_fit_config

    cfg, model_cfg = load_fit_config(kind, path, {})
    return {"model": dataclasses.asdict(model_cfg), "data": dataclasses.asdict(cfg.data),
            "trainer": dataclasses.asdict(cfg.trainer)}


def _differences(a, b):
    return {(s, k) for s in a for k in a[s] if a[s][k] != b[s][k]}


@pytest.mark.parametrize("kind, preset, documented", [
    ("cnn", "cnn.yaml", set()),
    ("bnn", "bnn.yaml", set()),
    ("vae", "vae.yaml", set()),
    # the presets that change something say what: a cosine schedule and fresh noise for blends, 24 epochs
    ("cnn", "cnn_blends.yaml", {("model", "lr_schedule"), ("data", "renoise"), ("trainer", "epochs")}),
    ("vae", "vae_clean.yaml", {("model", "inputs")}),
])
def test_a_fit_without_config_trains_as_the_measured_presets(kind, preset, documented):
    """The settings the documented quality was measured with are the defaults: a preset differs from
    a bare `cosmolit fit` only where it documents a change, and in compile (a speed option, off
    without a config so that short runs do not pay the compilation)."""
    from tests.conftest import REPO

    got = _differences(_sections(kind, None), _sections(kind, REPO / "configs" / preset))
    assert got == documented | {("trainer", "compile")}


def test_kind_defaults_yield_to_the_config_file_and_the_command_line(tmp_path):
    from cosmolit.train import load_fit_config

    cfg, _ = load_fit_config("bnn", None, {})
    assert (cfg.data.batch_size, cfg.trainer.epochs) == (8, 100)
    path = tmp_path / "b.yaml"
    path.write_text("data: {batch_size: 16}\n")
    cfg, _ = load_fit_config("bnn", path, {"trainer": {"epochs": 3}})
    assert (cfg.data.batch_size, cfg.trainer.epochs) == (16, 3)
