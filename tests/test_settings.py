"""Each setting described once: the run settings' flags are made from the fields of fastlm.config, so every field
has exactly one flag in each command that takes the run settings, every such flag sets its own field, --help shows
each field's real default, bench takes its model settings' defaults from the fields, and the README's flag table
agrees with the fields. Each check is a function returning the problems it finds; the last tests feed them broken
parsers and texts, so that a check which could never fail would show."""

import argparse
import re
from pathlib import Path

import pytest

from fastlm.cli import BENCH_SETTINGS, TRAIN_FLAGS, build_parser, overrides_from_args
from fastlm.config import RunConfig, setting_fields
from fastlm.flags import described, flags_of

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {f.name: (section, f) for section, f in setting_fields()}
# Options of these commands that are not run settings: what to do with the run, not what it is.
NOT_SETTINGS = {
    "train": {"help", "config", "resume", "overwrite", "onnx_export", "nproc"},
    "profile": {"help", "config", "warmup", "steps", "trace_steps", "out", "py_spy", "nsys"},
    "sweep": {"help", "config", "out", "cells", "axes", "cell_settings", "grid", "design", "seeds", "jobs", "devices",
              "max_minutes_per_run", "quick", "standard"},
}
# The PyTorch word_language_model example's defaults (its main.py), which fastlm's defaults are.
EXAMPLE_DEFAULTS = {"cell": "lstm", "emsize": 200, "nhid": 200, "nlayers": 2, "dropout": 0.2, "tied": False,
                    "lr": 20, "clip": 0.25, "epochs": 40, "batch_size": 20, "bptt": 35, "seed": 1111,
                    "log_interval": 200, "eval_batch_size": 10, "save": None, "dry_run": False}


def real_default(name: str):
    """The field's value in a fresh RunConfig: what a run gets when nothing sets it."""
    section, _ = FIELDS[name]
    return getattr(getattr(RunConfig(), section), name)


def written(name: str) -> str:
    """How --help and the README write the field's real default (what a None default means, for None)."""
    value = real_default(name)
    if value is None:
        return described(FIELDS[name][1]).unset or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def command(name: str) -> argparse.ArgumentParser:
    return build_parser().commands[name]


def is_shortcut(action: argparse.Action) -> bool:
    """A flag that sets its field to a constant (--accel); a switch (--tied) is a subclass, but a flag proper."""
    return type(action) is argparse._StoreConstAction


def flag_problems(parser: argparse.ArgumentParser, not_settings: set) -> list[str]:
    """Every option is a run setting or one of ``not_settings``; each setting has exactly one flag (its own
    spellings; the fields' declared shortcuts besides), named as the field says."""
    problems, flags = [], {}
    for action in parser._actions:
        if action.dest in not_settings:
            continue
        if action.dest not in FIELDS:
            problems.append(f"{'/'.join(action.option_strings)} sets no field of the run configuration")
        elif is_shortcut(action):
            shortcuts = {(flag, value) for flag, value, _ in described(FIELDS[action.dest][1]).shortcuts}
            if (action.option_strings[0], action.const) not in shortcuts:
                problems.append(f"{action.option_strings[0]} is a shortcut its field does not declare")
        else:
            flags.setdefault(action.dest, []).append(action.option_strings)
    for name, (_, f) in FIELDS.items():
        found = flags.get(name, [])
        if len(found) != 1:
            problems.append(f"{name} has {len(found)} flags: {found}")
        elif found[0][0] != flags_of(f)[0]:
            problems.append(f"{name}'s flag is {found[0][0]}, not {flags_of(f)[0]}")
    return problems


def help_entries(text: str) -> dict[str, str]:
    """--help text -> {an option's first flag: its whole entry on one line}."""
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line.strip().split(",")[0].split()[0]
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


def default_problems(help_text: str, names) -> list[str]:
    """Each field's --help entry ends its help with the field's real default."""
    entries, problems = help_entries(help_text), []
    for name in names:
        flag = flags_of(FIELDS[name][1])[0]
        shown = f"(default: {written(name)})"
        if flag not in entries:
            problems.append(f"{flag} is not in --help")
        elif not entries[flag].endswith(shown):
            problems.append(f"{flag}'s help does not end with {shown}: {entries[flag]}")
    return problems


@pytest.fixture
def wide_help(monkeypatch):
    """--help without line wrapping (argparse reads COLUMNS), so that no default is split at a hyphen."""
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.mark.parametrize("name", ["train", "profile", "sweep"])
def test_every_setting_has_exactly_one_flag_and_every_flag_sets_a_setting(name):
    assert flag_problems(command(name), NOT_SETTINGS[name]) == []


@pytest.mark.parametrize("name", ["train", "profile", "sweep"])
def test_help_shows_each_settings_real_default(name, wide_help):
    assert default_problems(command(name).format_help(), FIELDS) == []


def test_every_train_flag_sets_its_own_field():
    """All the settings' flags at once, each with a value other than its default: each lands in its field."""
    parser, argv, expected = command("train"), [], {}
    for action in parser._actions:
        if action.dest not in FIELDS or is_shortcut(action):
            continue
        default = real_default(action.dest)
        if isinstance(default, bool):
            argv.append(action.option_strings[0] if not default else action.option_strings[-1])
            expected[action.dest] = not default
            continue
        if action.choices:
            text = next(choice for choice in action.choices if choice != default)
        else:
            text = next(text for text in ("7", "0.5,0.25", "Somewhere") if _parses(action, text))
        argv += [action.option_strings[-1], text]
        expected[action.dest] = action.type(text) if action.type else text
    config = RunConfig()
    config.update(overrides_from_args(parser.parse_args(argv)), origin="test")
    for name, value in expected.items():
        section, field = TRAIN_FLAGS[name]
        assert (section, field) == (FIELDS[name][0], name)
        assert getattr(getattr(config, section), field) == value != real_default(name), name
    assert set(expected) == set(FIELDS)


def _parses(action: argparse.Action, text: str) -> bool:
    try:
        (action.type or str)(text)
        return True
    except (argparse.ArgumentTypeError, ValueError):
        return False


def test_the_example_s_own_spellings_set_their_fields():
    parser = command("train")
    args = parser.parse_args(["--use-optimizer", "--accel", "--batch_size", "3", "--cell", "GRU"])
    assert overrides_from_args(args) == {"model": {"cell": "gru"}, "data": {"batch_size": 3},
                                         "train": {"optimizer": "adamw", "device": "auto"}}
    assert overrides_from_args(parser.parse_args([])) == {}  # an absent flag leaves a --config file's value


def test_the_defaults_are_the_pytorch_example_s():
    assert {name: real_default(name) for name in EXAMPLE_DEFAULTS} == EXAMPLE_DEFAULTS


def test_bench_takes_its_model_settings_and_their_defaults_from_the_fields(wide_help):
    parser = command("bench")
    settings = [action for action in parser._actions if action.dest in BENCH_SETTINGS]
    assert sorted(action.dest for action in settings) == sorted(BENCH_SETTINGS)  # one flag each
    assert all(action.default is argparse.SUPPRESS for action in settings)  # no default of bench's own
    assert "--layers" in parser._option_string_actions  # bench's older spelling of --nlayers
    assert default_problems(parser.format_help(), BENCH_SETTINGS) == []
    args = parser.parse_args(["--layers", "3", "--dropout", "0.5", "--cell", "gru", "--precision", "bf16"])
    assert overrides_from_args(args, BENCH_SETTINGS) == {"model": {"nlayers": 3, "dropout": 0.5}}
    assert overrides_from_args(parser.parse_args([]), BENCH_SETTINGS) == {}


def flag_table(readme: str) -> list[tuple[list[str], str]]:
    """The `fastlm train` flag table of the README: (the code spans of the first column, the second column)."""
    lines = readme.split("| flag | meaning |\n| --- | --- |\n", 1)[1].split("\n\n", 1)[0].splitlines()
    rows = [line.strip("|").split(" | ", 1) for line in lines]
    return [(re.findall(r"`([^`]+)`", first), meaning.strip(" |")) for first, meaning in rows]


def readme_problems(readme: str, parser: argparse.ArgumentParser) -> list[str]:
    """The README restates choices and defaults in its flag table and the example's defaults above it: each must be
    the field's."""
    problems = []
    for spans, meaning in flag_table(readme):
        named = []
        for span in (span for span in spans if span.startswith("--")):
            flags, _, values = span.partition(" ")
            for flag in flags.split("/"):
                action = parser._option_string_actions.get(flag)
                if action is None:
                    problems.append(f"the README names {flag}, which fastlm train does not take")
                    continue
                named += [action.dest] if action.dest in FIELDS else []
                choices = described(FIELDS[action.dest][1]).choices if action.dest in FIELDS else None
                if "|" in values and choices and values.replace("\\|", "|").split("|") != list(choices):
                    problems.append(f"the README gives {flag} {values}, the field takes {'|'.join(choices)}")
        said = re.findall(r"(\S+) \(default\)|\(default `([^`]+)`\)|\((\d[\d.]*)\)$", meaning)
        if len(set(named)) == 1:
            for value in ("".join(parts) for parts in said):
                if value != written(named[0]):
                    problems.append(f"the README says {named[0]}'s default is {value}, it is {written(named[0])}")
    sentence = " ".join(readme.split("The PyTorch example's flags and defaults (", 1)[1].split(")", 1)[0].split())
    phrases = {"cell": "{}", "emsize": "emsize {}", "nhid": "nhid {}", "nlayers": "{} layers", "dropout": "dropout {}",
               "lr": "lr {}", "clip": "clip {}", "epochs": "{} epochs", "batch_size": "batch {}", "bptt": "bptt {}",
               "seed": "seed {}", "log_interval": "log every {} batches"}
    for name, phrase in phrases.items():
        text = phrase.format(written(name).upper() if name == "cell" else written(name))
        if not re.search(rf"(^|[ (,]){re.escape(text)}($|[ ,)])", sentence):
            problems.append(f"the README's example defaults do not say '{text}': {sentence}")
    return problems


def test_the_readme_states_the_fields_choices_and_defaults():
    assert readme_problems((ROOT / "README.md").read_text(encoding="utf-8"), command("train")) == []


def test_the_checks_find_what_they_look_for(wide_help):
    """Each check above, on a parser or text with one thing wrong: it must say so."""
    def train_with(*flags, **options):
        parser = command("train")
        parser.add_argument(*flags, **options)
        return parser

    assert flag_problems(command("train"), NOT_SETTINGS["train"]) == []  # the baseline the cases below break
    assert "sets no field" in " ".join(flag_problems(train_with("--hidden-size", type=int), NOT_SETTINGS["train"]))
    assert "2 flags" in " ".join(flag_problems(train_with("--hidden", dest="nhid"), NOT_SETTINGS["train"]))
    assert "does not declare" in " ".join(flag_problems(
        train_with("--sgd", dest="optimizer", action="store_const", const="sgd"), NOT_SETTINGS["train"]))
    help_text = command("train").format_help()
    assert default_problems(help_text.replace("(default: 200)", "(default: 300)", 1), ["emsize"])
    assert default_problems(help_text.replace("--emsize EMSIZE", "--embedding EMSIZE"), ["emsize"])
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for wrong in (readme.replace("`--lr-rule example\\|noise\\|noise-final`", "`--lr-rule example\\|noise`"),
                  readme.replace("sgd (default)", "adamw (default)"),
                  readme.replace("last save (10)", "last save (15)"),
                  readme.replace("(default `runs/<time>-<cell>-<backend>`)", "(default `runs/<cell>`)"),
                  readme.replace("`--threads N`", "`--thread N`"),
                  readme.replace("emsize 200, nhid 200", "emsize 650, nhid 200")):
        assert wrong != readme and readme_problems(wrong, command("train"))


# Every spelling `fastlm train` takes, frozen: a flag renamed or lost by a change to a field shows here (the
# PyTorch example's spellings among them: --model, --batch_size, --use-optimizer, --accel, --dry-run, --save).
TRAIN_SPELLINGS = """
-h --help --config --resume --overwrite --onnx-export --nproc
--model --cell --backend --variant --emsize --nhid --nlayers --dropout --tied --decoder --cutoffs
--data --batch-size --batch_size --eval-batch-size --bptt --data-mode
--lr --lr-rule --clip --optimizer --use-optimizer --weight-decay --betas --epochs --seed --log-interval --device
--accel --max-steps --max-minutes --dry-run --run-dir --save --save-minutes --steps-per-epoch --eval-batches
--threads --state --skip-nonfinite --step --precision --cuda-graphs --no-cuda-graphs --dist-timeout
""".split()


def test_the_train_flags_keep_their_spellings():
    assert sorted(command("train")._option_string_actions) == sorted(TRAIN_SPELLINGS)
