"""Each setting described once: a field of fastlm.config's dataclasses carries its flag, help and accepted values,
and every command's flags are made from those fields.

``setting(default, help, ...)`` declares such a field. ``add_setting_flags(parser, fields)`` adds one flag per
field to an argparse parser: the dest is the field's name, the flag the name with dashes unless the field names
its own (the PyTorch example's spellings, e.g. --model/--cell), the value parsed as the default's type (a
``False`` default is a switch, a ``True`` one a --x/--no-x pair) and ``--help`` ends with the field's own
default, as ``shown_default`` writes it. Flags left out stay out of the namespace (argparse.SUPPRESS), so a
value from a --config file is only replaced by a flag given. ``choices``, ``minimum`` and ``positive`` are
also what RunConfig.validate checks. Nothing here knows a particular setting: fastlm/config.py holds them all.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Optional


@dataclass(frozen=True)
class Setting:
    help: str  # what it does; --help adds the default
    flags: tuple = ()  # () : "--" + the field's name with dashes; else every spelling, the first shown first
    choices: Optional[tuple] = None  # the accepted values (argparse's choices, and validate's)
    parse: Optional[Callable] = None  # text -> value; None: the default's type (int, float; str for None)
    metavar: Optional[str] = None
    group: Optional[str] = None  # the --help group; None: the section's title
    unset: Optional[str] = None  # what a None default means, said in --help
    minimum: Optional[int] = None  # an integer of at least this (None stays allowed when the default is None)
    positive: bool = False  # a positive finite number (ditto)
    shortcuts: tuple = ()  # (flag, value, help): another flag that sets this field to value


def setting(default, help: str, **described) -> dataclasses.Field:
    """A dataclass field that is a user setting; ``described`` are the other fields of Setting."""
    return dataclasses.field(default=default, metadata={"setting": Setting(help, **described)})


def described(field: dataclasses.Field) -> Setting:
    return field.metadata["setting"]


def flags_of(field: dataclasses.Field) -> tuple:
    """The field's flag spellings, the first its name in messages and --help."""
    return described(field).flags or ("--" + field.name.replace("_", "-"),)


def shown_default(field: dataclasses.Field) -> str:
    """The field's default as --help prints it: on/off for a switch, 20 for 20.0, a list as 0.9,0.999."""
    value = field.default
    if value is None:
        return described(field).unset or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def add_setting_flags(parser: argparse.ArgumentParser, fields: Iterable[tuple[str, dataclasses.Field]],
                      titles: dict[str, str], group=None, more_flags: Optional[dict] = None) -> None:
    """One flag per (section, field); in ``group`` when given, else in a --help group per title (the field's
    own group, else ``titles[section]``). ``more_flags``: {field name: extra spellings} for this parser only."""
    groups = {}
    for section, field in fields:
        about = described(field)
        title = about.group or titles[section]
        if group is None and title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = group if group is not None else groups[title]
        help_text = f"{about.help} (default: {shown_default(field)})".replace("%", "%%")
        flags = flags_of(field) + tuple((more_flags or {}).get(field.name, ()))
        target.add_argument(*flags, dest=field.name, default=argparse.SUPPRESS, help=help_text,
                            **_value_options(field, about))
        for flag, value, shortcut_help in about.shortcuts:
            target.add_argument(flag, dest=field.name, action="store_const", const=value, default=argparse.SUPPRESS,
                                help=shortcut_help)


def _value_options(field: dataclasses.Field, about: Setting) -> dict:
    """add_argument's keywords for how the field's value is read."""
    if isinstance(field.default, bool):
        return {"action": "store_true" if not field.default else argparse.BooleanOptionalAction}
    options = {"choices": about.choices, "metavar": about.metavar}
    parse = about.parse or (type(field.default) if isinstance(field.default, (int, float)) else None)
    if parse is not None:
        options["type"] = parse
    return {key: value for key, value in options.items() if value is not None}
