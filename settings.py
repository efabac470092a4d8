"""Settings as plain data: each script's constants at its top, and below them a table that says
of each one its help, its flag and how a saved run treats it.

    DATA_DIR = "data"
    ...
    SETTINGS = [Setting("DATA_DIR", "folder with the ISIC folders", RECORDED, flag="--data"), ...]

From the table and the constants' values, `add_flags` makes the flags (default: the constant's
value, help: the table's text), `parse` tells which settings the command line gave, `recipe`
is what a checkpoint records, and `resume_conflicts` / `take_saved` are the resume check. No
source file is read: adding a setting is its constant, its row and its use.

`--print-settings` (every script has it) prints the table with the constants' values as JSON
(`describe`): the one place the benchmarks and checkpoint.py read train_model.py's defaults
and older-record values from, without importing a script (`read_script`). `markdown` writes
the tables of docs/settings.md: `python settings.py` rewrites that part of the file.
"""
import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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
    shown: str = None       # the default as docs/settings.md words it, where the value
    #                        depends on the machine (WORKERS)

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
    parser.add_argument("--print-settings", action=PrintSettings, table=table, values=values,
                        help="print every setting (value, flag, role, help) as JSON and exit")


class PrintSettings(argparse.Action):
    """--print-settings: `describe` of the script's table, as JSON on stdout."""

    def __init__(self, option_strings, dest, table=(), values=None, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.table, self.values = table, values

    def __call__(self, parser, namespace, given, option_string=None):
        print(json.dumps(describe(self.table, self.values), indent=1))
        parser.exit()


def describe(table, values):
    """{NAME: {value, option, key, role, help[, older][, choices]}} of a script's settings,
    plain JSON values; "older" only where a record may predate the setting."""
    out = {}
    for s in table:
        row = {"value": plain(values[s.name]), "option": s.option, "key": s.key,
               "role": s.role, "help": s.help}
        if s.older is not IN_EVERY_RECORD:
            row["older"] = plain(s.older)
        if s.choices is not None:
            row["choices"] = list(s.choices)
        if s.shown is not None:
            row["shown"] = s.shown
        out[s.name] = row
    return out


def read_script(script):
    """`describe` of a script's settings, read by running `python SCRIPT --print-settings` (a
    script is never imported by another file of the project)."""
    out = subprocess.run([sys.executable, str(script), "--print-settings"], capture_output=True,
                         text=True, cwd=Path(script).parent)
    if out.returncode != 0:
        raise SettingError(f"{script} --print-settings failed: "
                           f"{(out.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(out.stdout)


def defaults(described):
    """{NAME: value} of `describe`'s output, tuples as the constants hold them."""
    return {name: as_setting(row["value"]) for name, row in described.items()}


def older_values(table):
    """{key: older-record value} of the recorded settings a record may predate."""
    return {s.key: s.older for s in table
            if s.role != MACHINE and s.older is not IN_EVERY_RECORD}


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


# ----------------------------------------------------------------------------- docs/settings.md

DOC = Path(__file__).with_name("docs") / "settings.md"
DOC_SCRIPTS = ("train_model.py", "test_model.py", "export_model.py")
DOC_MARK = "## Every setting"  # what follows it in docs/settings.md is written by `markdown`


def markdown(described):
    """The "Every setting" part of docs/settings.md: one table per script, from
    {script name: describe(...)}."""
    lines = [DOC_MARK, "", "Written by `python settings.py` from the scripts' `SETTINGS` tables "
             "(a test checks that it is current).", ""]
    for script, rows in described.items():
        recorded = any(row["role"] != MACHINE for row in rows.values())
        head = ["constant", "flag", "default"] + (["on resume", "older record"] if recorded
                                                  else []) + ["what it does"]
        lines += [f"### `{script}`", "", "| " + " | ".join(head) + " |",
                  "|" + " --- |" * len(head)]
        for name, row in rows.items():
            cells = [f"`{name}`", f"`{flag_text(row)}`", f"`{shown_default(row)}`"]
            if recorded:
                older = ("-" if row["role"] == MACHINE else
                         f"`{shown_value(row['older'])}`" if "older" in row else "every record")
                cells += [row["role"], older]
            lines.append("| " + " | ".join(cells + [row["help"].replace("|", "\\|")]) + " |")
        lines.append("")
    return "\n".join(lines)


def flag_text(row):
    if isinstance(row["value"], bool):
        return f"{row['option']} / --no-{row['option'][2:]}"
    return row["option"]


def shown_value(value):
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def shown_default(row):
    return row.get("shown") or shown_value(row["value"])


def write_doc(path=DOC):
    """Rewrite the tables of docs/settings.md from the scripts' --print-settings."""
    text = Path(path).read_text()
    head = text[:text.index(DOC_MARK)]
    tables = markdown({name: read_script(Path(path).parent.parent / name)
                       for name in DOC_SCRIPTS})
    Path(path).write_text(head + tables)
    return path


if __name__ == "__main__":
    print(f"wrote {write_doc()}")
