"""Settings as plain data: each script's constants at its top, and below them a table that says
of each one its help, its flag and how a saved run treats it.

    DATA_DIR = "data"
    ...
    SETTINGS = [Setting("DATA_DIR", "folder with the ISIC folders", RECORDED, flag="--data"), ...]

From the table and the constants' values, `add_flags` makes the flags (default: the constant's
value, help: the table's text), `parse` tells which settings the command line gave, `recipe`
is what a checkpoint records, and `resume_conflicts` / `take_saved` are the resume check. No
source file is read: adding a setting is its constant, its row and its use.
"""
import argparse
from dataclasses import dataclass

# How a saved run treats a setting:
FIXED = "fixed"        # part of the run: recorded in every checkpoint; --resume takes it from
#                        the state and refuses a flag that differs
RECORDED = "recorded"  # recorded too, but a resume may change it (EPOCHS extends a run)
MACHINE = "machine"    # how this machine runs it, not what the run is: never recorded

# `Setting.older` of a setting that every record the project has written holds (version 2 on)
IN_EVERY_RECORD = "in every record"


class SettingError(ValueError):
    """A setting that cannot work; the message names the constant."""


@dataclass(frozen=True)
class Setting:
    name: str               # the constant, e.g. "IMAGE_SIZE"
    help: str               # the flag's help
    role: str = MACHINE     # FIXED, RECORDED or MACHINE
    flag: str = None        # default: --lower-case-name
    metavar: tuple = None   # names of a tuple's parts, e.g. ("H", "W")
    choices: tuple = None
    type: object = None     # default: the type of the constant's value (str for None)
    nargs: str = None       # "+" for a list of any length (CHECKPOINT, THRESHOLDS)
    older: object = IN_EVERY_RECORD  # a recorded setting added later: the value a record
    #                        written before it existed stands for (the behaviour the code had
    #                        then), never today's default

    @property
    def option(self):
        return self.flag or "--" + self.name.lower().replace("_", "-")

    @property
    def key(self):
        """The attribute of the parsed arguments, and the key in a checkpoint's settings."""
        return self.option[2:].replace("-", "_")


def none_or_str(value):
    """A flag value where "none" means None (ENCODER_WEIGHTS, CHECKPOINT...)."""
    return None if value.lower() in ("none", "null", "") else value


def add_flags(parser, table, values):
    """One flag per setting. Defaults stay unset here (argparse.SUPPRESS), so that `parse`
    can tell a given flag from a default; the help shows the constant's value."""
    for s in table:
        if s.name not in values:
            raise SettingError(f"SETTINGS names {s.name}, but the script has no such constant")
        default = values[s.name]
        options = dict(dest=s.key, default=argparse.SUPPRESS,
                       help=f"{s.help} (default: {default_text(default)})")
        if isinstance(default, bool):
            options["action"] = argparse.BooleanOptionalAction
        elif s.nargs:
            options.update(nargs=s.nargs, type=s.type or (type(default[0]) if default else str),
                           metavar=s.metavar)
        elif isinstance(default, tuple):
            options.update(nargs=len(default), type=s.type or type(default[0]),
                           metavar=s.metavar or (s.name,) * len(default))
        else:
            options["type"] = s.type or (none_or_str if default is None else type(default))
        if s.choices is not None:
            options["choices"] = s.choices
        parser.add_argument(s.option, **options)


def default_text(value):
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value).replace("%", "%%")  # argparse formats help with %


def parse(parser, table, values, argv=None):
    """(arguments, the keys of the settings the command line gave); every setting not given
    takes its constant's value, tuples as tuples."""
    args = parser.parse_args(argv)
    given = {s.key for s in table if hasattr(args, s.key)}
    for s in table:
        value = getattr(args, s.key, values[s.name])
        setattr(args, s.key, as_setting(value))
    return args, given


def recipe(table, args):
    """The settings a checkpoint records (FIXED and RECORDED), as plain JSON-able values."""
    return {s.key: plain(getattr(args, s.key)) for s in table if s.role != MACHINE}


def plain(value):
    """A setting as a checkpoint (JSON) stores it: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


def as_setting(value):
    """A stored or parsed setting as its constant holds it: lists as tuples."""
    return tuple(value) if isinstance(value, list) else value


def resume_conflicts(table, saved, args, given):
    """"NAME=saved, not given" for each FIXED setting given on the command line that differs
    from the run's saved settings."""
    differ = []
    for s in table:
        if s.role == FIXED and s.key in given and s.key in saved:
            value, current = as_setting(saved[s.key]), getattr(args, s.key)
            if value != current:
                differ.append(f"{s.name}={value!r}, not {current!r}")
    return differ


def take_saved(table, saved, args, given):
    """The run's recorded settings into `args`, where the command line did not give them. A
    setting the record predates takes its `older` value, never today's default."""
    for s in table:
        if s.role != MACHINE and s.key not in given:
            if s.key in saved:
                setattr(args, s.key, as_setting(saved[s.key]))
            elif s.older is not IN_EVERY_RECORD:
                setattr(args, s.key, as_setting(s.older))
