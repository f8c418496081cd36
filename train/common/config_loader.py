"""Config files and dotted command-line overrides -> the frozen onn_jax.config.Config.

A config file is a Python file with `get_config()` returning an ml_collections.ConfigDict
(or a plain dict) nested like Config (model, optim, mesh, data, train, checkpoint):

    onn-train --config configs/tiny.py --config.train.steps=50 --config.model.moe.w_kl 0.5

Override values are parsed to the type of the value they replace (bool from true/false/1/0,
int, float, str); where the file holds None or a list, as a Python literal (`None`, `0.5`,
`[1, 2]`), else as a string. Every error is a `ConfigLoadError` naming the config file, the
dotted key and, where it can be found, the line of the file that set it. Whatever a config
file raises or exits with while it loads or in get_config() (SystemExit included; a
KeyboardInterrupt stays an interrupt) is such an error, so a config file can never end onn-train
with its own exit code.
"""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from onn_jax.config import Config, ConfigError, from_dict, to_dict

OVERRIDE_PREFIX = "--config."


class ConfigLoadError(ValueError):
    """A config file or an override is invalid; the message names the file, key and line."""


def exec_python_file(path: Path, module_name: str):
    """Runs the Python file at `path` as a fresh module (not registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Runs `get_config()` of the Python file at `path` and returns it as a nested plain dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigLoadError(f"{path}: config file not found")
    try:
        module = exec_python_file(path, f"_onn_config_{path.stem}")
    except KeyboardInterrupt:  # Ctrl-C while loading: an interrupt, not the file's fault
        raise
    except BaseException as e:  # noqa: BLE001 - the file itself is broken (or exits): say where
        raise ConfigLoadError(f"{path}:{_exc_line(e, path)}: cannot load config file: {_what(e)}") from e
    if not callable(getattr(module, "get_config", None)):
        raise ConfigLoadError(f"{path}: defines no get_config() function")
    try:
        cfg = module.get_config()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - SystemExit included: a config error, never an exit
        raise ConfigLoadError(f"{path}:{_exc_line(e, path)}: get_config() failed: {_what(e)}") from e
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise ConfigLoadError(f"{path}: get_config() must return a ConfigDict or dict, "
                              f"got {type(cfg).__name__}")
    return _plain(cfg)


def split_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Separates `--config.a.b=V` / `--config.a.b V` pairs from the other arguments."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(OVERRIDE_PREFIX):
            body = arg[len(OVERRIDE_PREFIX):]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(argv):
                key, value = body, argv[i + 1]
                i += 1
            else:
                raise ConfigLoadError(f"{arg}: override needs a value (--config.{body}=VALUE)")
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
                raise ConfigLoadError(f"{arg}: malformed override key {key!r}")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def apply_overrides(cfg: dict[str, Any], overrides: Sequence[tuple[str, str]],
                    source: str = "<config>") -> dict[str, Any]:
    """Returns a copy of `cfg` with each dotted key set to its parsed value.

    The key must already exist in `cfg` (typos are errors, not new fields); `load` passes the
    file merged over the Config defaults, so every Config field is accepted.
    """
    cfg = _plain(cfg)
    for key, raw in overrides:
        node, parts = cfg, key.split(".")
        for depth, part in enumerate(parts):
            here = ".".join(parts[:depth + 1])
            if not isinstance(node, dict) or part not in node:
                known = sorted(node) if isinstance(node, dict) else []
                raise ConfigLoadError(f"--config.{key}: unknown key {here!r} in {source}; "
                                      f"known keys there: {known}")
            if depth < len(parts) - 1:
                node = node[part]
        if isinstance(node[parts[-1]], dict):
            raise ConfigLoadError(f"--config.{key}: {key!r} is a section of {source}, "
                                  f"not a value; override one of {sorted(node[parts[-1]])}")
        node[parts[-1]] = parse_value(raw, node[parts[-1]], f"--config.{key}")
    return cfg


def parse_value(raw: str, current: Any, where: str) -> Any:
    """Parses `raw` to the type of `current` (the value it replaces)."""
    if isinstance(current, bool):
        low = raw.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigLoadError(f"{where}={raw}: expected a bool (true/false)")
    if isinstance(current, int):  # an int in the file may stand for a float field (lr = 1)
        for kind in (int, float):
            try:
                return kind(raw)
            except ValueError:
                pass
        raise ConfigLoadError(f"{where}={raw}: expected an integer")
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigLoadError(f"{where}={raw}: expected a number") from None
    if isinstance(current, str):
        return raw
    try:  # None, lists, tuples: a Python literal, else the raw string
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
    return list(value) if isinstance(value, tuple) else value


def build_config(cfg: Mapping[str, Any], source: str = "<config>",
                 overrides: Sequence[tuple[str, str]] = ()) -> Config:
    """The validated frozen Config; errors name the override, or the file, field and line."""
    try:
        return from_dict(Config, cfg)
    except ConfigError as e:
        given = dict(overrides)
        if e.field in given:
            raise ConfigLoadError(f"--config.{e.field}={given[e.field]}: {e.message}") from e
        line = find_line(source, e.field)
        where = f"{source}:{line}" if line else source
        raise ConfigLoadError(f"{where}: {e.field}: {e.message}") from e
    except TypeError as e:  # a field that is not a dataclass got a mapping, etc.
        raise ConfigLoadError(f"{source}: {e}") from e


def with_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The file's values over the Config defaults, so any Config field can be overridden
    (keys unknown to Config are kept for build_config to reject with their line)."""
    def merge(base, top):
        out = dict(base)
        for k, v in top.items():
            out[k] = merge(base[k], v) if isinstance(base.get(k), dict) and isinstance(v, Mapping) else v
        return out
    return merge(to_dict(Config()), _plain(cfg))


def load(path: str | Path, overrides: Sequence[tuple[str, str]] = ()) -> Config:
    """Config file + overrides -> Config (the whole of what onn-train does with its flags)."""
    raw = apply_overrides(with_defaults(load_config_file(path)), overrides, str(path))
    return build_config(raw, str(path), overrides)


def load_saved(path: str | Path, overrides: Sequence[tuple[str, str]] = ()) -> Config:
    """A run's saved config.json (written by onn-train) + overrides -> Config."""
    import json
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deeply
        raise ConfigLoadError(f"{path}: cannot read the run's saved config: "
                              f"{'JSON nested too deeply' if isinstance(e, RecursionError) else e}") from None
    if not isinstance(saved, Mapping):
        raise ConfigLoadError(f"{path}: the run's saved config is not a JSON object")
    raw = apply_overrides(with_defaults(saved), overrides, str(path))
    return build_config(raw, str(path), overrides)


def find_line(source: str, dotted: str) -> int | None:
    """Best-effort line of `source` assigning the last component of `dotted` (0 if absent)."""
    try:
        lines = Path(source).read_text().splitlines()
    except OSError:
        return None
    leaf = re.escape(dotted.rsplit(".", 1)[-1])
    pattern = re.compile(rf"(\.{leaf}\s*=[^=])|(\b{leaf}\s*=[^=])|(['\"]{leaf}['\"]\s*:)")
    hits = [i + 1 for i, text in enumerate(lines) if pattern.search(text)]
    return hits[-1] if hits else None


def _what(e: BaseException) -> str:
    """What a config file raised, in words; an exit (sys.exit, exit(), raise SystemExit) says so,
    since a config file only defines get_config() and must not end the program."""
    if isinstance(e, SystemExit):
        return (f"it calls sys.exit({e.code!r}) (SystemExit); a config file must only define "
                "get_config()")
    return f"{type(e).__name__}: {e}"


def _exc_line(e: BaseException, path: Path) -> str:
    if isinstance(e, SyntaxError) and e.lineno:
        return str(e.lineno)
    tb, line = e.__traceback__, "?"
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
            line = str(tb.tb_lineno)
        tb = tb.tb_next
    return line


def _plain(value: Any) -> Any:
    """Deep copy into plain dicts/lists (ConfigDict leaves and tuples normalised)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
