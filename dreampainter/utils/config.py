"""One configuration system: typed dataclass schemas filled from YAML files, mappings and overrides.

``load_config(TrainConfig, "configs/x.yaml", ["optim.lr=5e-5"])`` merges, in order: the schema's
defaults, the chain of ``base:`` files (each path relative to the file naming it), the file, then the
``key=value`` overrides, and returns a typed instance (``OmegaConf.to_object``: every dataclass's
``__post_init__`` runs). :func:`config_from_dict` does the same for one mapping (a JSONL line, a dict
in code). Every problem is one :class:`InvalidInputError` line naming the source and the key::

    configs/x.yaml: unknown config key 'optim.lrr'
    override 'train.batch_size=abc': bad value for 'train.batch_size' (Value 'abc' of type 'str' ...)
    configs/x.yaml: bad value for 'train.mixed_precision' (Invalid value 'fp32', expected one of [no, fp16, bf16])
    jobs.jsonl:3: unknown config key 'steps' (renamed: use 'num_inference_steps')

Schema conventions:

* choices are :class:`Choice` enums: str-valued, so YAML strings work and members equal their strings;
* checks the types cannot express live in ``__post_init__`` and raise :class:`ConfigValueError` with
  the key relative to that dataclass; the loader adds the section path and names the source (the
  last file or override that set the key);
* ``RENAMED_KEYS`` (a ClassVar ``{old: new}``): an old key is an error naming the new one;
* ``SHORTHAND_KEY`` (a ClassVar): a plain value given for this section means ``{SHORTHAND_KEY: value}``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from dreampainter.errors import InvalidInputError, MissingFileError

T = TypeVar("T")
E = TypeVar("E", bound="Choice")


class Choice(str, Enum):
    """A string choice: ``MixedPrecision.bf16 == "bf16"``, ``str()`` and f-strings give the value.

    Members must be named as their values (OmegaConf looks YAML strings up by name).
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> list[str]:
        return [member.value for member in cls]


class ConfigValueError(InvalidInputError):
    """A value check in a config dataclass's ``__post_init__``.

    ``key`` is relative to that dataclass; ``related`` names the other keys a cross-field rule reads
    (the loader names whichever source set one of them last).
    """

    def __init__(self, key: str, problem: str, related: Iterable[str] = ()) -> None:
        self.key, self.problem, self.related = key, problem, tuple(related)
        super().__init__(f"bad value for '{key}' ({problem})")


# ------------------------------------------------------------------------------- value checks


def as_choice(value: Any, choice: type[E], key: str) -> E:
    """``value`` as a member of ``choice``; otherwise an error listing the valid choices."""
    if isinstance(value, choice):
        return value
    try:
        return choice(value)
    except ValueError:
        raise ConfigValueError(key, f"must be one of {', '.join(choice.values())}; got {value!r}") from None


def coerce_choices(config: Any) -> None:
    """Turn the plain strings in a dataclass's :class:`Choice` fields into members (errors list the choices).

    For instances made in code; the loader already gives members.
    """
    for name, kind in _field_types(type(config)).items():
        if isinstance(kind, type) and issubclass(kind, Choice):
            setattr(config, name, as_choice(getattr(config, name), kind, name))


def check_int(value: Any, key: str, minimum: int | None = None, optional: bool = False) -> None:
    """An int (not a bool), >= ``minimum`` unless that is None; or None when ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        wanted = {None: "an integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ConfigValueError(key, f"must be {wanted}, got {value!r}")


def check_number(value: Any, key: str, minimum: float = 0.0, optional: bool = False) -> None:
    """A finite int or float (not a bool) >= ``minimum``, or None when ``optional``."""
    if optional and value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < minimum
    ):
        raise ConfigValueError(key, f"must be a finite number >= {minimum:g}, got {value!r}")


# ------------------------------------------------------------------------------- loading


@dataclasses.dataclass
class _Source:
    name: str  # what an error names: a file, "override 'k=v'", "jobs.jsonl:3"
    values: dict[str, Any]
    keys: set[str] = dataclasses.field(default_factory=set)  # every dotted key it sets


def load_config(
    schema: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> T:
    """Schema defaults <- ``base:`` chain <- ``path`` <- ``key=value`` ``overrides``, as a ``schema`` instance."""
    sources = _read_chain(Path(path)) if path is not None else []
    for item in overrides or ():
        if "=" not in item:
            raise InvalidInputError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
        try:
            values = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
        except OmegaConfBaseException as error:
            raise InvalidInputError(f"override {item!r}: cannot parse it ({_message(error)})") from None
        sources.append(_Source(f"override {item!r}", values))
    return _build(schema, sources, str(path) if path is not None else "config")


def config_from_dict(schema: type[T], values: Mapping[str, Any] | None, source: str = "config") -> T:
    """A ``schema`` instance from one plain or OmegaConf mapping; errors name ``source``."""
    if values is None:
        values = {}
    if OmegaConf.is_config(values):
        values = OmegaConf.to_container(values, resolve=True)
    if not isinstance(values, Mapping):
        raise InvalidInputError(f"{source}: expected a mapping of config keys, got {type(values).__name__}")
    return _build(schema, [_Source(source, _plain(values))], source)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain containers (choices as their strings), e.g. for JSON."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True, enum_to_str=True)


def config_to_yaml(config: Any) -> str:
    """A config dataclass as YAML that :func:`load_config` reads back."""
    return OmegaConf.to_yaml(OmegaConf.structured(config), resolve=True)


def _plain(values: Any) -> Any:
    """Deep copy of nested mappings / sequences as dicts / lists (the caller's object is not touched)."""
    if isinstance(values, Mapping):
        return {key: _plain(value) for key, value in values.items()}
    if isinstance(values, (list, tuple)):
        return [_plain(value) for value in values]
    return values


def _read_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[_Source]:
    """The sources from the deepest ``base`` file to ``path``."""
    resolved = path.resolve()
    if resolved in seen:
        raise InvalidInputError(f"{path}: circular 'base' chain")
    if not path.exists():
        raise MissingFileError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 - YAML syntax errors come in several types
        raise InvalidInputError(f"{path}: cannot parse YAML ({_yaml_problem(error)})") from None
    if not isinstance(node, DictConfig):
        raise InvalidInputError(f"{path}: a config file must be a mapping")
    values = OmegaConf.to_container(node, resolve=False)
    base = values.pop("base", None)
    chain = _read_chain(path.parent / str(base), (*seen, resolved)) if base else []
    return [*chain, _Source(str(path), values)]


def _build(schema: type[T], sources: list[_Source], fallback: str) -> T:
    config = OmegaConf.structured(schema)
    for source in sources:
        _prepare(schema, source.values, source.name, "")
        source.keys = _flat_keys(source.values)
        try:
            config = OmegaConf.merge(config, source.values)
        except (ConfigKeyError, ConfigAttributeError) as error:
            raise InvalidInputError(f"{source.name}: unknown config key '{_key(error)}'") from None
        except OmegaConfBaseException as error:
            raise InvalidInputError(
                f"{source.name}: bad value for '{_key(error)}' ({_message(error)})"
            ) from None
    return _instantiate(config, sources, fallback)


def _instantiate(config: DictConfig, sources: list[_Source], fallback: str) -> Any:
    try:
        return OmegaConf.to_object(config)
    except MissingMandatoryValue as error:
        raise InvalidInputError(f"{fallback}: missing config key '{_key(error)}'") from None
    except ConfigValueError as error:
        prefix, error = _locate(config) or ("", error)
        key = prefix + error.key
        name = _source_of([key, *(prefix + k for k in error.related)], sources, fallback)
        raise InvalidInputError(f"{name}: bad value for '{key}' ({error.problem})") from None
    except OmegaConfBaseException as error:  # e.g. an interpolation that does not resolve
        raise InvalidInputError(f"{fallback}: bad value for '{_key(error)}' ({_message(error)})") from None
    except InvalidInputError as error:
        raise InvalidInputError(f"{fallback}: {error}") from None


def _locate(node: DictConfig, prefix: str = "") -> tuple[str, ConfigValueError] | None:
    """The section (``"a.b."``) whose ``__post_init__`` fails, deepest first, and its error."""
    for key in node:
        child = node[key]
        if isinstance(child, DictConfig):
            found = _locate(child, f"{prefix}{key}.")
            if found is not None:
                return found
    if dataclasses.is_dataclass(OmegaConf.get_type(node)):
        try:
            OmegaConf.to_object(node)
        except ConfigValueError as error:
            return prefix, error
    return None


def _source_of(keys: list[str], sources: list[_Source], fallback: str) -> str:
    """The last source that set one of ``keys`` (or something inside them), else ``fallback``."""
    keys = [re.sub(r"\[\d+\]", "", key) for key in keys]
    for source in reversed(sources):
        for key in keys:
            if key in source.keys or any(k.startswith(f"{key}.") for k in source.keys):
                return source.name
    return fallback


def _flat_keys(values: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in values.items():
        name = f"{prefix}{key}"
        keys.add(name)
        if isinstance(value, Mapping):
            keys |= _flat_keys(value, f"{name}.")
    return keys


def _prepare(schema: type, values: Any, source: str, prefix: str) -> None:
    """Expand shorthands and reject renamed keys in ``values`` (in place), walking the schema."""
    if not isinstance(values, dict):
        return
    types_ = _field_types(schema)
    renamed = getattr(schema, "RENAMED_KEYS", {})
    for key in list(values):
        if key not in types_:
            if key in renamed:
                raise InvalidInputError(
                    f"{source}: unknown config key '{prefix}{key}' (renamed: use '{prefix}{renamed[key]}')"
                )
            continue  # the merge reports it
        section, is_mapping = _section_type(types_[key])
        if section is None:
            continue
        if is_mapping and isinstance(values[key], dict):
            for name, entry in values[key].items():
                values[key][name] = _prepare_section(section, entry, source, f"{prefix}{key}.{name}.")
        elif not is_mapping:
            values[key] = _prepare_section(section, values[key], source, f"{prefix}{key}.")


def _prepare_section(section: type, value: Any, source: str, prefix: str) -> Any:
    shorthand = getattr(section, "SHORTHAND_KEY", None)
    if shorthand is not None and (value is None or isinstance(value, (str, int, float, bool))):
        return {shorthand: value}
    _prepare(section, value, source, prefix)
    return value


@functools.cache
def _field_types(schema: type) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    return {field.name: hints[field.name] for field in dataclasses.fields(schema)}


def _section_type(kind: Any) -> tuple[type | None, bool]:
    """``(dataclass, False)`` for a (optional) dataclass field, ``(dataclass, True)`` for a dict of them."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        kind = args[0] if len(args) == 1 else None
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return kind, False
    if typing.get_origin(kind) in (dict, Mapping):
        args = typing.get_args(kind)
        if len(args) == 2 and isinstance(args[1], type) and dataclasses.is_dataclass(args[1]):
            return args[1], True
    return None, False


def _key(error: OmegaConfBaseException) -> str:
    return str(getattr(error, "full_key", None) or getattr(error, "key", None) or "?")


def _message(error: OmegaConfBaseException) -> str:
    return _first_line(getattr(error, "msg", None) or error)


def _yaml_problem(error: Exception) -> str:
    """The YAML parser's own problem and where it is (``found duplicate key 'lr' at line 4, column 3``)."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return _first_line(error)


def _first_line(error: Any) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


__all__ = [
    "Choice",
    "ConfigValueError",
    "as_choice",
    "check_int",
    "check_number",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "coerce_choices",
    "load_config",
]
