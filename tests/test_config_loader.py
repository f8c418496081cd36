"""Config files + dotted overrides -> Config: typing of values and the error messages."""
import textwrap
from pathlib import Path

import pytest

from onn_jax.config import Config
from train.common.config_loader import (
    ConfigLoadError,
    apply_overrides,
    load,
    load_config_file,
    parse_value,
    split_overrides,
)

CONFIGS = ("tiny", "default", "reference", "gpu_small", "gpu_large")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load(name):
    assert isinstance(load(f"configs/{name}.py"), Config)


def test_reference_and_gpu_large_sizes():
    ref = load("configs/reference.py").model
    assert (ref.hidden, ref.moe.intermediate, ref.moe.num_experts, ref.num_layers, ref.num_heads) == (32, 128, 32, 1, 4)
    assert load("configs/reference.py").data.seq_len == 256
    big = load("configs/gpu_large.py")
    m = big.model
    assert (m.hidden, m.moe.intermediate, m.moe.num_experts, m.num_layers, m.vocab_size, m.dtype) == \
        (512, 256, 64, 8, 32000, "bfloat16")
    assert (big.data.batch_size, big.data.seq_len) == (32, 512)


def test_split_overrides_both_forms():
    overrides, rest = split_overrides(["--config", "c.py", "--config.train.steps=5", "--workdir", "d",
                                       "--config.model.moe.w_kl", "0.5"])
    assert overrides == [("train.steps", "5"), ("model.moe.w_kl", "0.5")]
    assert rest == ["--config", "c.py", "--workdir", "d"]


def test_split_overrides_missing_value_and_bad_key():
    with pytest.raises(ConfigLoadError, match="needs a value"):
        split_overrides(["--config.train.steps"])
    with pytest.raises(ConfigLoadError, match="malformed override key"):
        split_overrides(["--config.train..steps=1"])


@pytest.mark.parametrize("raw,current,expected", [
    ("7", 3, 7), ("0.5", 1.0, 0.5), ("2", 1.0, 2.0), ("1e-4", 1, 1e-4), ("true", False, True),
    ("0", True, False), ("NO", True, False), ("abc", "x", "abc"),
    ("None", None, None), ("4", None, 4), ("[1, 2]", None, [1, 2]), ("(1, 2)", [0], [1, 2]),
    ("hello", None, "hello")])
def test_parse_value_follows_the_replaced_type(raw, current, expected):
    got = parse_value(raw, current, "--config.x")
    assert got == expected and type(got) is type(expected)


def test_parse_value_rejects_bad_bool_int_and_float():
    with pytest.raises(ConfigLoadError, match=r"--config.x=None: expected an integer"):
        parse_value("None", 3, "--config.x")
    with pytest.raises(ConfigLoadError, match=r"--config.x=maybe: expected a bool"):
        parse_value("maybe", True, "--config.x")
    with pytest.raises(ConfigLoadError, match=r"--config.x=fast: expected a number"):
        parse_value("fast", 0.1, "--config.x")


def test_overrides_reach_fields_the_file_leaves_at_default():
    cfg = load("configs/tiny.py", [("train.steps", "3"), ("optim.clip_norm", "1.5"),
                                   ("model.moe.fallback_k", "1"), ("optim.grad_filter.mode", "off"),
                                   ("train.progress", "true")])
    assert (cfg.train.steps, cfg.optim.clip_norm, cfg.model.moe.fallback_k) == (3, 1.5, 1)
    assert cfg.optim.grad_filter.mode == "off" and cfg.train.progress is True
    assert load("configs/tiny.py").optim.clip_norm is None  # the file itself is untouched


def test_unknown_override_key_names_key_and_file():
    with pytest.raises(ConfigLoadError) as e:
        load("configs/tiny.py", [("model.moe.num_expert", "4")])
    msg = str(e.value)
    assert "--config.model.moe.num_expert" in msg and "configs/tiny.py" in msg and "num_experts" in msg


def test_section_override_is_an_error():
    with pytest.raises(ConfigLoadError, match="is a section"):
        apply_overrides({"model": {"hidden": 1}}, [("model", "3")])


def test_invalid_override_value_names_the_override():
    with pytest.raises(ConfigLoadError, match=r"^--config.model.moe.num_experts=0: must be > 0"):
        load("configs/tiny.py", [("model.moe.num_experts", "0")])
    with pytest.raises(ConfigLoadError, match=r"^--config.train.steps=1.5: must be an integer"):
        load("configs/tiny.py", [("train.steps", "1.5")])


def _write(tmp_path, body: str):
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_bad_value_in_file_names_file_and_line(tmp_path):
    path = _write(tmp_path, """\
        from onn_jax.configdict import ConfigDict


        def get_config():
            c = ConfigDict()
            c.model = ConfigDict()
            c.model.num_heads = 3
            return c
        """)
    with pytest.raises(ConfigLoadError, match=rf"^{path}:7: model.num_heads: must divide hidden"):
        load(path)


def test_unknown_key_in_file_names_file_and_line(tmp_path):
    path = _write(tmp_path, """\
        def get_config():
            return {"train": {"stepz": 3}}
        """)
    with pytest.raises(ConfigLoadError, match=rf"^{path}:2: train.stepz: unknown key"):
        load(path)


def test_broken_files(tmp_path):
    with pytest.raises(ConfigLoadError, match="config file not found"):
        load_config_file(tmp_path / "missing.py")
    with pytest.raises(ConfigLoadError, match="defines no get_config"):
        load_config_file(_write(tmp_path, "X = 1\n"))
    with pytest.raises(ConfigLoadError, match=r"cfg.py:2: get_config\(\) failed: ZeroDivisionError"):
        load_config_file(_write(tmp_path, "def get_config():\n    return 1 / 0\n"))
    with pytest.raises(ConfigLoadError, match=r"cfg.py:1: cannot load config file: SyntaxError"):
        load_config_file(_write(tmp_path, "def get_config(:\n"))
    with pytest.raises(ConfigLoadError, match="must return a ConfigDict or dict"):
        load_config_file(_write(tmp_path, "def get_config():\n    return [1]\n"))


def test_configs_load_without_ml_collections(monkeypatch):
    """Bare accelerator images have no ml_collections: the config files fall back to a plain
    attribute dict and load to the same values."""
    import importlib
    import sys

    import onn_jax.configdict
    names = CONFIGS
    with_mlc = {n: load_config_file(ROOT / "configs" / f"{n}.py") for n in names}
    monkeypatch.setitem(sys.modules, "ml_collections", None)
    try:
        fallback = importlib.reload(onn_jax.configdict)
        assert fallback.ConfigDict.__module__ == "onn_jax.configdict"
        for n in names:
            assert load_config_file(ROOT / "configs" / f"{n}.py") == with_mlc[n], n
    finally:
        monkeypatch.undo()
        importlib.reload(onn_jax.configdict)
