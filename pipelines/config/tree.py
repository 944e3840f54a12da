"""A configuration is a tree of frozen dataclasses; this module reads and writes one as dotted keys.

A leaf is a field that is not itself a dataclass; its key is its dotted path (`optim.lr`). A value from the
command line (text) or from a YAML file (a parsed value) is typed from the field's annotation, resolved with
`typing.get_type_hints`; a value that does not fit, or a key that is not in the tree, is a `ConfigError` naming
it. Besides its key a leaf answers to its flag's name (`lambda_vac` for `--lambda-vac`), so the names of the
flags, and of the ablations written with them, keep working in files and `--set`.

Field metadata read here: `choices`, `aliases` (value -> value, e.g. base2new -> base2novel), `min`, `sorted`
(a list kept sorted and without repeats), `check` (a function normalising or refusing the value), `flag`.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from pathlib import Path

import yaml

NONE_WORDS = ("none", "null", "~")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key (and the file), `problem`
    says what is wrong with the value alone (a flag's error names the flag instead)."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


def _invalid(leaf: "Leaf", where: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}{leaf.key}: {problem}", problem)


@dataclasses.dataclass(frozen=True)
class Leaf:
    key: str                     # dotted path in the tree
    field: dataclasses.Field
    hint: object                 # the field's type, resolved

    @property
    def meta(self):
        return self.field.metadata

    @property
    def flags(self) -> tuple[str, ...]:
        flag = self.meta.get("flag")
        return (flag,) if isinstance(flag, str) else tuple(flag or ())


@functools.cache
def leaves(cls) -> dict[str, Leaf]:
    """Every leaf of the tree rooted at `cls`, by key, in field order."""
    found = {}
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            found.update({f"{item.name}.{key}": dataclasses.replace(leaf, key=f"{item.name}.{key}")
                          for key, leaf in leaves(hint).items()})
        else:
            found[item.name] = Leaf(item.name, item, hint)
    return found


@functools.cache
def aliases(cls) -> dict[str, tuple[str, ...]]:
    """Flag names as keys: 'lambda_vac' -> ('loss.vac',), 'prompt_depth' -> both towers' depths."""
    names: dict[str, tuple[str, ...]] = {}
    for key, leaf in leaves(cls).items():
        for flag in leaf.flags:
            name = flag.lstrip("-").replace("-", "_")
            names[name] = names.get(name, ()) + (key,)
    return names


def resolve_key(cls, name: str, where: str = "") -> tuple[str, ...]:
    """The leaf key(s) a name means: a dotted key, or a flag's name (dashes allowed, as on the command line)."""
    name = name.strip().lstrip("-").replace("-", "_")
    if name in leaves(cls):
        return (name,)
    if name in aliases(cls):
        return aliases(cls)[name]
    close = difflib.get_close_matches(name, [*leaves(cls), *aliases(cls)], n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; keys: {', '.join(leaves(cls))}"
    raise ConfigError(f"{where}unknown configuration key {name!r}{hint}")


def defaults(cls) -> dict[str, object]:
    """Each leaf's default (a default factory is called now: a path default reads the environment)."""
    return flatten(cls())


def flatten(config) -> dict[str, object]:
    """{dotted key: value} of a configuration object."""
    flat = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            flat.update({f"{item.name}.{key}": inner for key, inner in flatten(value).items()})
        else:
            flat[item.name] = value
    return flat


def build(cls, values: dict[str, object]):
    """The configuration object of `cls` with `values` ({dotted key: typed value}) over the defaults."""
    unknown = sorted(set(values) - set(leaves(cls)))
    if unknown:
        raise ConfigError(f"unknown configuration key(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    arguments = {}
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            prefix = item.name + "."
            inner = {key[len(prefix):]: value for key, value in values.items() if key.startswith(prefix)}
            arguments[item.name] = build(hints[item.name], inner)
        elif item.name in values:
            arguments[item.name] = values[item.name]
    return cls(**arguments)


def plain(value):
    """A value as YAML and JSON write it: paths as text, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    return value


def nested(config) -> dict:
    """A configuration object as a nested dict of plain values (what config.yaml holds)."""
    out = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        out[item.name] = nested(value) if dataclasses.is_dataclass(value) else plain(value)
    return out


def from_mapping(cls, mapping, where: str = "") -> dict[str, object]:
    """{dotted key: typed value} of a nested mapping (a YAML file): a section of the tree is a mapping, a leaf a
    value; keys may also be dotted or a flag's name. `where` prefixes every error (e.g. the file)."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}expected a mapping of settings, got {type(mapping).__name__}")
    sections = {key.rsplit(".", 1)[0] for key in leaves(cls) if "." in key}
    sections |= {section.rsplit(".", i)[0] for section in sections for i in range(section.count(".") + 1)}
    flat: dict[str, object] = {}

    def walk(items: dict, prefix: str) -> None:
        for name, value in items.items():
            if not isinstance(name, str):
                raise ConfigError(f"{where}key {name!r} is not a name")
            path = prefix + name
            if path in sections:
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}{path} is a section ({', '.join(_section_keys(cls, path))}): "
                                      f"expected a mapping, got {value!r}")
                walk(value, path + ".")
                continue
            for key in resolve_key(cls, path, where):
                flat[key] = coerce(leaves(cls)[key], value, where=where)

    walk(mapping, "")
    return flat


def _section_keys(cls, section: str) -> list[str]:
    return [key[len(section) + 1:] for key in leaves(cls) if key.startswith(section + ".")]


def parse_assignment(cls, text: str, where: str = "--set ") -> dict[str, object]:
    """'optim.lr=0.01' -> {'optim.lr': 0.01}: the value typed from the field (YAML syntax for lists and maps)."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"{where}{text!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
    return {key: coerce(leaves(cls)[key], raw.strip(), text=True, where=where)
            for key in resolve_key(cls, name, where)}


def coerce(leaf: Leaf, value, text: bool = False, where: str = ""):
    """`value` as the leaf's type: from the command line (text=True: a string, YAML syntax for lists and maps) or
    from a file (a parsed YAML value). Aliases, choices, bounds and the field's own check apply to both."""
    try:
        typed = _typed(leaf.hint, _alias(leaf, value), text)
    except (TypeError, ValueError) as error:
        raise _invalid(leaf, where, str(error)) from None
    choices = leaf.meta.get("choices")
    if choices and typed not in choices and typed is not None:
        raise _invalid(leaf, where, f"{typed!r} is not one of {', '.join(map(str, choices))}")
    low = leaf.meta.get("min")
    if low is not None and isinstance(typed, (int, float)) and typed < low:
        raise _invalid(leaf, where, f"{typed!r} is below the minimum {low}")
    if leaf.meta.get("sorted") and typed is not None:
        typed = tuple(sorted(set(typed)))
    check = leaf.meta.get("check")
    if check is not None:
        try:
            typed = check(typed)
        except ValueError as error:
            raise _invalid(leaf, where, str(error)) from None
    if isinstance(typed, float) and math.isnan(typed):   # after the field's check, which may say it better
        raise _invalid(leaf, where, "expected a number, got nan")
    return typed


def _alias(leaf: Leaf, value):
    names = leaf.meta.get("aliases", {})
    return names[value] if isinstance(value, str) and value in names else value


def _typed(hint, value, text: bool):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
            return None
        return _typed(options[0], value, text)
    if value is None:
        raise ValueError("needs a value (it cannot be null)")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected text, got {value!r} (quote it in YAML)")
    if text and isinstance(value, str) and hint is not Path:
        value = _yaml_value(value)
    if hint is bool:
        return _boolean(value)
    if hint is int:
        return _integer(value)
    if hint is float:
        return _number(value)
    if hint is Path:
        if isinstance(value, (str, Path)) and str(value):
            return Path(value)
        raise ValueError(f"expected a path, got {value!r}")
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        items = value if isinstance(value, (list, tuple)) else _split(value)
        return tuple(_typed(item, entry, text) for entry in items)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise ValueError(f"expected a mapping of names like {{dino: abc}}, got {value!r}")
        inner = typing.get_args(hint)[1]
        if inner is str:
            return {key: str(entry) if isinstance(entry, (int, float)) else _typed(str, entry, text)
                    for key, entry in value.items()}
        return {key: _typed(inner, entry, text) for key, entry in value.items()}
    if hint is dict:   # a mapping of plain values (an agent's settings)
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise ValueError(f"expected a mapping of names, got {value!r}")
        return dict(value)
    raise TypeError(f"a field of type {hint} cannot be configured")


def _yaml_value(text: str):
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _split(value) -> list:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, str):
        raise ValueError(f"expected a list like 1,2,3, got {value!r}")
    return [part for part in value.replace("+", ",").replace(" ", ",").split(",") if part]


def _boolean(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, int)) and str(value).strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return str(value).strip().lower() in TRUE_WORDS
    raise ValueError(f"expected true or false, got {value!r}")


def _integer(value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"expected an integer, got {value!r}")


def _number(value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        return float(value)   # YAML reads 5e-4 (no dot) as text; it is still a number
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
