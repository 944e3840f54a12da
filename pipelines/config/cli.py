"""Click options generated from a configuration tree, and what a command line contributes to a configuration.

Every leaf with a `flag` in its metadata becomes an option (leaves sharing a flag become one option that sets
them all); every leaf is reachable with `--set KEY=VALUE`; `--config NAME|FILE` names a file or a shipped
configuration. The layers, lowest first: the defaults, the file, the --set assignments, the flags given.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click
from click.core import ParameterSource

from pipelines.config.files import read_config
from pipelines.config.tree import ConfigError, Leaf, coerce, defaults, leaves, parse_assignment, plain

CONFIG_PARAM, SET_PARAM = "config_file", "assignments"


@dataclasses.dataclass(frozen=True)
class Layers:
    """What a command line asks for, as {dotted key: typed value} per source."""

    file: dict
    sets: dict
    flags: dict

    def merged(self) -> dict:
        return {**self.file, **self.sets, **self.flags}


def param_name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def flag_groups(cls, skip=()) -> dict[str, list[Leaf]]:
    """Options by parameter name: the leaves each sets; the class's own fields first, then those it inherits."""
    own = set(vars(cls).get("__annotations__", {}))
    ordered = sorted(leaves(cls).values(), key=lambda leaf: leaf.key.split(".")[0] not in own)
    groups: dict[str, list[Leaf]] = {}
    for leaf in ordered:
        if leaf.flags and leaf.key not in skip:
            groups.setdefault(param_name(leaf.flags[0]), []).append(leaf)
    return groups


def tree_options(cls, skip=()):
    """Decorator: the tree's flags, --config and --set."""
    values = defaults(cls)
    options = [_option(group, values[group[0].key]) for group in flag_groups(cls, skip).values()]
    options.append(click.option("--config", CONFIG_PARAM, default=None, metavar="NAME|FILE",
                                help="A YAML configuration: a file (e.g. a run's config.yaml, to reproduce it) or a "
                                     "shipped one: base2novel (alias base2new), fewshot, cross, dg."))
    options.append(click.option("--set", SET_PARAM, multiple=True, metavar="KEY=VALUE",
                                help="Set any configuration key (repeat), e.g. optim.lr=0.01 or "
                                     "prompts.depth_text=3. Precedence: defaults < --config < --set < flags."))

    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function
    return decorate


def _option(group: list[Leaf], default):
    leaf = group[0]
    meta = leaf.meta
    hint = _bare(leaf.hint)
    hidden_default = default in (None, "", {}, ()) or hint is bool
    shown = meta.get("show_default", None if hidden_default else _shown(default))
    help_text = meta.get("flag_help", meta.get("help", "")) + (f"  [default: {shown}]" if shown is not None else "")
    kwargs = {"default": None, "help": help_text, "metavar": meta.get("metavar")}
    if meta.get("multiple"):
        kwargs.update(multiple=True, default=())
    elif hint is bool:
        kwargs.update(is_flag=True, default=False)
    elif meta.get("choices"):
        kwargs["type"] = click.Choice([str(choice) for choice in (*meta["choices"], *meta.get("aliases", {}))])
    elif hint is int:
        kwargs["type"] = click.IntRange(min=meta["min"]) if "min" in meta else click.INT
    elif hint is float:
        kwargs["type"] = click.FloatRange(min=meta["min"]) if "min" in meta else click.FLOAT
    elif hint is Path:
        kwargs["type"] = click.Path(path_type=Path)
    return click.option(*leaf.flags, param_name(leaf.flags[0]), **kwargs)


def _bare(hint):
    args = [arg for arg in getattr(hint, "__args__", ()) if arg is not type(None)]
    return args[0] if len(args) == 1 and type(None) in getattr(hint, "__args__", ()) else hint


def _shown(value) -> str:
    value = plain(value)
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def layers(ctx: click.Context, cls, skip=()) -> Layers:
    """The --config file, the --set assignments and the flags given on this command line, each typed."""
    params = ctx.params
    try:
        file = read_config(cls, params[CONFIG_PARAM]) if params.get(CONFIG_PARAM) else {}
        sets = {}
        for text in params.get(SET_PARAM, ()):
            sets.update(parse_assignment(cls, text))
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    flags = {}
    for name, group in flag_groups(cls, skip).items():
        if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            continue
        value = params[name]
        multiple = group[0].meta.get("multiple")
        if multiple:
            try:
                value = multiple(value) if callable(multiple) else _pairs(value)
            except ValueError as error:
                raise click.BadParameter(str(error), param_hint=group[0].flags[0]) from None
        for leaf in group:
            try:
                flags[leaf.key] = coerce(leaf, value, text=isinstance(value, str))
            except ConfigError as error:
                raise click.BadParameter(error.problem, param_hint=leaf.flags[0]) from None
    return Layers(file, sets, flags)


def _pairs(values) -> dict[str, str]:
    """Repeated NAME=VALUE flags -> {name: value}."""
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected NAME=VALUE, got {value!r}")
        pairs[name.strip()] = rest.strip()
    return pairs


def plain_option(cls, key: str):
    """A click option of one leaf that carries the leaf's default (for commands that take no configuration, e.g.
    `datasets fewshot --shots`), typed as a configuration types it."""
    leaf = leaves(cls)[key]
    flag = leaf.flags[0]
    item = leaf.field
    default = item.default_factory if item.default is dataclasses.MISSING else item.default
    shown = leaf.meta.get("show_default", _shown(default) if not callable(default) else True)

    def typed(ctx, param, value):
        try:
            return coerce(leaf, value, text=isinstance(value, str))
        except ConfigError as error:
            raise click.BadParameter(error.problem) from None

    kwargs = {"type": click.Choice(leaf.meta["choices"])} if leaf.meta.get("choices") else {}
    if _bare(leaf.hint) is Path:
        kwargs = {"type": click.Path(path_type=Path)}
    return click.option(*leaf.flags, param_name(flag), default=_click_default(default), show_default=shown,
                        callback=typed, help=leaf.meta.get("help"), metavar=leaf.meta.get("metavar"), **kwargs)


def _click_default(default):
    if callable(default):
        return default
    value = plain(default)
    return ",".join(map(str, value)) if isinstance(value, list) else value
