"""Reading the tree: dataclass defaults <- YAML files (with `include:`) <- `key=value` overrides; saving it.

`read_config` checks what the tree itself can tell (keys, types, ranges, constant choices, paths): the checks
that need a component (a registry, timm, a group on this machine) are theirs, composed by
`vkd_dist.configure.load_config`, which is what loads a config for work."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import yaml

from vkd_dist.config.checks import STRUCTURAL
from vkd_dist.config.schema import DEFAULT_CONFIG, Config, ConfigError, config_keys_named, unknown_key


# --------------------------------------------------------------------------- conversion
def _is_dataclass_type(tp: Any) -> typing.TypeGuard[Any]:  # narrows away None for mypy
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {getattr(base, '__name__', base)})")
    if _is_dataclass_type(base):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(base, value, key)
    origin = typing.get_origin(base) or base
    if origin is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if origin is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if origin is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise unknown_key(f"{prefix}.{unknown[0]}" if prefix else unknown[0], prefix or "top level", names,
                          config_keys_named(unknown[0]))
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("image_encoder_kwargs", "text_config"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _data_section(tree: dict) -> dict:
    data = tree.get("data")
    return data if isinstance(data, dict) else {}  # a malformed section is reported when the tree is built


def _scope_synthetic(tree: dict, old_path: Any, sets_build: bool) -> None:
    """After a layer: if it moved data.path without setting data.build_synthetic, building is off, since the
    earlier layer's `build_synthetic: true` was meant for its own path."""
    data = _data_section(tree)
    if not sets_build and "path" in data and not _same_path(data["path"], old_path):
        tree["data"] = {**data, "build_synthetic": False}


def _same_path(a: Any, b: Any) -> bool:
    """The same directory however written: the SLURM launcher pins data.path as an absolute override."""
    if a is None or b is None:
        return a is b
    return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def _layer(tree: dict, update: dict) -> dict:
    """`update` merged over `tree` as one layer of the config (see the module docstring)."""
    merged = _deep_merge(tree, update)
    _scope_synthetic(merged, _data_section(tree).get("path"), "build_synthetic" in _data_section(update))
    return merged


def _yaml_mapping(path: Path) -> dict:
    """One YAML file's own mapping, `include:` still in it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def _with_includes(path: Path, raw: dict, seen: tuple[Path, ...] = ()) -> dict:
    merged: dict = {}
    for inc in raw.pop("include", []) or []:
        merged = _layer(merged, _read_yaml(path.parent / inc, seen + (path,)))
    return _layer(merged, raw)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML file with its includes merged in (each include a layer under the file's own keys)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle")
    return _with_includes(path, _yaml_mapping(path), seen)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    value = yaml.safe_load(text) if text.strip() else None
    return key.split("."), value


def _apply_override(tree: dict, parts: list[str], value: Any, cls: type = Config) -> None:
    node: dict = tree
    node_cls: Optional[type] = cls
    for i, part in enumerate(parts):
        key = ".".join(parts[: i + 1])
        fields = {f.name: f for f in dataclasses.fields(node_cls)} if node_cls else {}
        if node_cls and part not in fields:
            raise unknown_key(key, ".".join(parts[:i]) or "top level", fields, config_keys_named(part))
        ftype = _unwrap_optional(typing.get_type_hints(node_cls)[part])[0] if node_cls else None
        last = i == len(parts) - 1
        if last:
            # `objective=image_only`: a scalar given for a section with a `name` field sets that name.
            if _is_dataclass_type(ftype) and not isinstance(value, dict):
                if "name" not in {f.name for f in dataclasses.fields(ftype)}:
                    raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.<key>=value")
                node.setdefault(part, {})["name"] = value
            elif _is_dataclass_type(ftype) and isinstance(value, dict):
                node[part] = _deep_merge(node.get(part, {}) or {}, value)
            else:
                node[part] = value
            return
        if _is_dataclass_type(ftype):
            node = node.setdefault(part, {})
            node_cls = ftype
        else:  # free-form dict field (e.g. model.text_config.hidden_size=128)
            sub = node.get(part)
            if sub is None:
                sub = node[part] = {}
            if not isinstance(sub, dict):
                raise ConfigError(f"{key} is not a mapping")
            node, node_cls = sub, None


def _sets_build_synthetic(parts: list[str], value: Any) -> bool:
    return parts == ["data", "build_synthetic"] or (parts == ["data"] and isinstance(value, dict)
                                                     and "build_synthetic" in value)


def read_config(path: Optional[str | Path] = None, overrides: Optional[Iterable[str]] = None,
                checks: Sequence[Callable[[Config], None]] = STRUCTURAL) -> Config:
    """Dataclass defaults <- configs/default.yaml (unless FILE has an `include:` key) <- FILE <- key=value
    overrides (one layer); then `checks`, in order (by default the structural ones of config/checks.py;
    vkd_dist.configure.load_config passes them interleaved with the components' own)."""
    raw = to_dict(Config())
    file = Path(path).resolve() if path else None
    own = _yaml_mapping(file) if file else None
    if own is None or "include" not in own:  # a user's file changes the default, it does not start from scratch
        raw = _layer(raw, _read_yaml(DEFAULT_CONFIG))
    if file is not None and own is not None:
        raw = _layer(raw, _with_includes(file, own))
    old_path, sets_build = _data_section(raw).get("path"), False
    for item in overrides or []:
        parts, value = _parse_override(item)
        _apply_override(raw, parts, value)
        sets_build = sets_build or _sets_build_synthetic(parts, value)
    _scope_synthetic(raw, old_path, sets_build)
    cfg = _build(Config, raw)
    for check in checks:
        check(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_from_dict(raw: dict) -> Config:
    """A saved run's config; checked for shape and types only, since its paths may have moved."""
    return _build(Config, _deep_merge(to_dict(Config()), raw))


def overrides_from_yaml(path: str | Path) -> list[str]:
    """A YAML overlay (e.g. configs/tiny.yaml) as `key=value` overrides for `read_config`, so that it applies on
    top of any config file. Sections flatten to dotted keys; free-form mappings (model.text_config) stay one
    value, so they replace the configured mapping as they would in a config file rather than merge into it."""
    out: list[str] = []
    doc_end = "\n..."  # what safe_dump puts after a bare scalar

    def walk(node: dict, cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for key, value in node.items():
            ftype = _unwrap_optional(hints[key])[0] if key in hints else None  # unknown keys: read_config says so
            if isinstance(value, dict) and _is_dataclass_type(ftype):
                walk(value, ftype, f"{prefix}{key}.")
            else:
                text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=float("inf"))
                out.append(f"{prefix}{key}={text.strip().removesuffix(doc_end)}")

    walk(_read_yaml(Path(path)), Config, "")
    return out
