"""Run configuration: dataclasses per component, a TOML file, and command-line overrides.

Every field is a user setting and carries its own description (fastlm.flags.setting): its help, its flag when
that is not the field's name with dashes, the values it accepts and its range. The train, profile, bench and
sweep flags, the flag-to-field map and the simple range checks of ``validate`` are made from these fields, so
adding a setting is adding one field here (plus its use, and a check in ``validate`` only when it needs more
than choices, a minimum or positivity).

Precedence, lowest first: the dataclass defaults (the PyTorch word_language_model example's defaults),
then ``--config FILE.toml`` (sections ``[model]``, ``[data]``, ``[train]`` with the field names below),
then flags given on the command line. ``to_dict()`` is what a run folder's ``config.json`` holds and what a
checkpoint carries, so a run can be rebuilt from it; ``write_toml`` writes a configuration back as a
``--config`` file (what `fastlm profile --py-spy` and `fastlm sweep` hand to the runs they start).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import tomllib

from fastlm.errors import FastlmError
from fastlm.flags import described, flags_of, setting

# The precision settings (fastlm.precision says what each does; kept here too so that reading a config
# does not import torch).
PRECISIONS = ("fp32", "tf32", "bf16", "auto")

# Seeds: torch's generators take [0, 2^64); fastlm adds the rank (and a step) to a seed, so it takes [0, 2^63).
MAX_SEED = 2**63 - 1

# The recurrent cells fastlm knows, in one place (fastlm.cells.math holds their math, in this order).
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
# The cells `fastlm bench` and `fastlm sweep` compare when not told which.
COMPARED_CELLS = ("lstm", "gru")
# The optimizers (fastlm.step.optimizer builds them): "sgd" is the example's p -= lr * grad.
OPTIMIZERS = ("sgd", "adamw")
# The kernel variants a backend may offer (the triton backend's, in the order its registry entry lists them);
# "auto" is every backend's default.
VARIANTS = ("per-step", "persistent", "auto")
# When the lr is annealed (fastlm.train.lr_rule says why; kept here too so that reading a config imports no torch).
LR_RULES = ("example", "noise", "noise-final")
# How a corpus is held (fastlm.data.sources says what each does; kept here so that a config imports no torch).
DATA_MODES = ("auto", "memory", "stream")
DECODERS = ("full", "adaptive")
STEPS = ("fast", "example")
STATES = ("carry", "reset")


def int_list(text: str) -> list[int]:
    """``2000,10000`` -> [2000, 10000] (a flag's value)."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_pair(text: str) -> list[float]:
    """``0.9,0.999`` -> [0.9, 0.999] (a flag's value)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, e.g. 0.9,0.999; got {text!r}")
    return values


@dataclass
class ModelConfig:
    cell: str = setting("lstm", f"the recurrent cell, any case: {', '.join(CELLS)}", flags=("--model", "--cell"),
                        parse=str.lower)
    backend: str = setting("cudnn", "the recurrent implementation: cudnn (torch.nn), reference, script, triton, "
                                    "compile (fastlm.cells.available() lists those that run here)")
    emsize: int = setting(200, "embedding size", minimum=1)
    nhid: int = setting(200, "hidden units per layer", minimum=1)
    nlayers: int = setting(2, "recurrent layers", minimum=1)
    dropout: float = setting(0.2, "dropout probability, in [0, 1)")
    tied: bool = setting(False, "tie embedding and decoder weights (needs --emsize equal to --nhid)")
    decoder: str = setting("full", "full: the full softmax; adaptive: an adaptive softmax, a different (smaller, "
                                   "faster) model, opt-in", choices=DECODERS)
    cutoffs: Optional[list] = setting(None, "adaptive softmax clusters by frequency rank", parse=int_list,
                                      metavar="C1,C2,...", unset="2000,10000: Wikitext-2's, scaled to the vocabulary")
    variant: str = setting("auto", "the triton backend's time loop: one kernel launch per time step, or one "
                                   "persistent launch per layer walking all steps; auto: persistent where it should "
                                   "be faster (fastlm.cells.triton, README)", choices=VARIANTS)


@dataclass
class DataConfig:
    data: str = setting("wikitext-2", "wikitext-2 (found or downloaded), generated, or a folder with train.txt, "
                                      "valid.txt and test.txt")
    batch_size: int = setting(20, "batch size", flags=("--batch-size", "--batch_size"), minimum=1)
    eval_batch_size: int = setting(10, "eval batch size", minimum=1)
    bptt: int = setting(35, "sequence length", minimum=1)
    data_mode: str = setting("auto", "memory: the token ids held in memory; stream: read from the token cache "
                                     "through a memory map (corpora bigger than memory); auto: stream above 128 MiB "
                                     "of text. The same batches either way", choices=DATA_MODES)


@dataclass
class TrainConfig:
    lr: float = setting(20.0, "initial learning rate", positive=True)
    clip: float = setting(0.25, "gradient clipping norm", positive=True)
    optimizer: str = setting(
        "sgd", "sgd: the example's p -= lr * grad; adamw: torch's AdamW (fused kernels where the device has them; "
               "give it a small --lr, e.g. 1e-3)", choices=OPTIMIZERS,
        shortcuts=(("--use-optimizer", "adamw", "the PyTorch example's spelling of --optimizer adamw"),))
    weight_decay: Optional[float] = setting(None, "decoupled weight decay for adamw, L2 for sgd", parse=float,
                                            unset="the optimizer's own: 0.01 for adamw, 0 for sgd, as torch's")
    betas: Optional[list] = setting(None, "AdamW's betas", parse=float_pair, metavar="B1,B2",
                                    unset="torch's, 0.9,0.999")
    epochs: int = setting(40, "epochs", minimum=1)
    seed: int = setting(1111, "random seed, from 0 to 2^63-1")
    log_interval: int = setting(200, "batches per log line", minimum=1)
    device: str = setting(
        "auto", "auto: torch's current accelerator (CUDA, XPU or MPS), else the CPU; or cpu, cuda, xpu, mps "
                "(cuda:1 for one of several)",
        shortcuts=(("--accel", "auto", "the PyTorch example's spelling of --device auto"),))
    max_steps: Optional[int] = setting(None, "pause once the run has done this many steps in all (resume to go on)",
                                       parse=int, minimum=1)
    max_minutes: Optional[float] = setting(None, "pause after this many minutes of this invocation (resume to go "
                                                 "on)", parse=float, positive=True)
    dry_run: bool = setting(False, "a couple of steps of everything, in seconds")
    run_dir: Optional[str] = setting(None, "folder for everything the run writes", unset="runs/<time>-<cell>-<backend>")
    save: Optional[str] = setting(None, "also copy the best checkpoint to this path")
    save_minutes: float = setting(10.0, "also save 'last' at a log line once this many minutes passed since the "
                                        "last save", positive=True)
    step: str = setting("fast", "fast, or example: the PyTorch example's loop as it is, the baseline of every "
                                "speed-up", choices=STEPS, group="speed")
    precision: str = setting(
        "fp32", "fp32: exact, TF32 off everywhere; tf32: GEMMs and the recurrence may use TF32; bf16: the "
                "decoder's GEMMs in bf16, the rest fp32; auto: bf16 where the device has bf16 matrix units, else "
                "fp32 (tf32 and bf16 change the numbers; fastlm.precision)", choices=PRECISIONS, group="speed")
    cuda_graphs: bool = setting(True, "on CUDA, capture the fast step's fixed-shape steps once as a CUDA graph and "
                                      "replay them", group="speed")
    skip_nonfinite: int = setting(0, "skip up to N batches whose loss or gradients are NaN/inf (no update), "
                                     "recorded in metrics; the next one stops the run (0: stop at the first)",
                                  metavar="N", minimum=0)
    steps_per_epoch: Optional[int] = setting(None, "an epoch of N batches (validation and the lr schedule after "
                                                   "each), continuing through the corpus from where the last epoch "
                                                   "stopped", parse=int, metavar="N", minimum=1,
                                             unset="one pass over the training split")
    eval_batches: Optional[int] = setting(None, "validate and test on the first N batches of valid and test only "
                                                "(quicker, said so in reports)", parse=int, metavar="N", minimum=1,
                                          unset="all of them")
    threads: Optional[int] = setting(None, "torch's CPU threads", parse=int, metavar="N", minimum=1,
                                     unset="torch's")
    state: str = setting("carry", "carry (the example's): the hidden state goes on from chunk to chunk, detached; "
                                  "reset: every chunk starts from zeros, in training and evaluation (what carrying "
                                  "is worth)", choices=STATES)
    lr_rule: str = setting("example", "when to divide the lr by 4 after an epoch: example when validation did not "
                                      "improve; noise only when it got worse by more than its standard error (short "
                                      "epochs); noise-final the noise rule, and once more before the last epoch "
                                      "(fastlm.train.lr_rule)", choices=LR_RULES)
    dist_timeout: float = setting(300.0, "several processes: seconds one waits for another (a collective for a "
                                         "missing process) before the run stops", metavar="SECONDS", positive=True,
                                  group="speed")


# The sections of a RunConfig, and the title of each one's flags in --help.
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
SECTION_TITLES = {"model": "model", "data": "data", "train": "training"}


def setting_fields() -> list[tuple[str, dataclasses.Field]]:
    """(section, field) for every setting of a RunConfig, in order."""
    return [(section, f) for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)]


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, origin: str = "config") -> "RunConfig":
        config = cls()
        config.update(_upgraded(values), origin)
        return config

    def update(self, values: dict, origin: str) -> None:
        """Overwrite fields from a {section: {field: value}} mapping; unknown names are errors."""
        for section_name, section_values in values.items():
            section = getattr(self, section_name, None)
            if not dataclasses.is_dataclass(section) or not isinstance(section_values, dict):
                raise FastlmError(f"{origin}: unknown section [{section_name}]; sections are [model], [data], [train]")
            known = {f.name for f in dataclasses.fields(section)}
            for key, value in section_values.items():
                if key not in known:
                    raise FastlmError(f"{origin}: unknown key {key!r} in [{section_name}]; "
                                      f"known keys: {', '.join(sorted(known))}")
                setattr(section, key, value)

    def validate(self) -> "RunConfig":
        """Check value ranges that do not need the data; raises FastlmError naming the flag. The choices, minimums
        and positivity the fields declare are checked for every field; what needs more is spelled out here."""
        m, d, t = self.model, self.data, self.train
        m.cell = str(m.cell).lower()
        if m.cell not in CELLS:
            raise FastlmError(f"--cell {m.cell!r} is not supported; choose one of {', '.join(CELLS)}")
        for flag, value in (("--backend", m.backend), ("--data", d.data), ("--device", t.device)):
            if not isinstance(value, str) or not value:
                raise FastlmError(f"{flag} must be a name, got {value!r}")
        for flag, value in (("--tied", m.tied), ("--dry-run", t.dry_run)):
            if not isinstance(value, bool):
                raise FastlmError(f"{flag} must be true or false, got {value!r}")
        if not isinstance(t.cuda_graphs, bool):
            raise FastlmError(f"cuda_graphs must be true or false, got {t.cuda_graphs!r}")
        for section, f in setting_fields():
            _check_declared(f, getattr(getattr(self, section), f.name))
        if isinstance(m.dropout, bool) or not isinstance(m.dropout, (int, float)) or not 0.0 <= m.dropout < 1.0:
            raise FastlmError(f"--dropout must be in [0, 1), got {m.dropout}")
        if m.tied and m.emsize != m.nhid:
            raise FastlmError(f"--tied needs --emsize equal to --nhid, got emsize {m.emsize} and nhid {m.nhid}")
        if m.variant != "auto" and m.backend != "triton":
            raise FastlmError(f"--variant {m.variant} chooses the triton backend's kernels; the {m.backend} backend "
                              f"has one way to run: drop --variant or use --backend triton")
        if m.decoder == "adaptive" and m.tied:
            raise FastlmError("--tied cannot be combined with --decoder adaptive; drop one of them")
        if m.cutoffs is not None:
            cutoffs = list(m.cutoffs)
            if (not cutoffs or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in cutoffs)
                    or cutoffs != sorted(set(cutoffs))):
                raise FastlmError(f"--cutoffs must be increasing positive integers, e.g. 2000,10000; got {m.cutoffs!r}")
            m.cutoffs = cutoffs
        if isinstance(t.seed, bool) or not isinstance(t.seed, int) or not 0 <= t.seed <= MAX_SEED:
            raise FastlmError(f"--seed must be an integer from 0 to 2^63-1, got {t.seed!r}")
        _check_optimizer(t)
        for flag, value in (("--run-dir", t.run_dir), ("--save", t.save)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise FastlmError(f"{flag} must name a path, got {value!r}")
        if not re.fullmatch(r"auto|cpu|(cuda|xpu|mps)(:\d+)?", str(t.device)):
            raise FastlmError(f"--device must be auto, cpu, or an accelerator: cuda, xpu or mps (cuda:1 for one of "
                              f"several), got {t.device!r}")
        if t.step == "example" and (m.backend != "cudnn" or m.decoder != "full" or t.precision not in ("fp32", "tf32")
                                    or t.skip_nonfinite):
            raise FastlmError("--step example is the PyTorch example's loop as it is: it needs --backend cudnn, "
                              "--decoder full, --precision fp32 or tf32 and no --skip-nonfinite")
        return self


def _check_declared(f: dataclasses.Field, value) -> None:
    """The checks a field declares (choices, minimum, positive); None passes where None is the default."""
    about, flag = described(f), flags_of(f)[0]
    if value is None and f.default is None:
        return
    if about.choices is not None:
        _one_of(flag, value, about.choices)
    if about.minimum is not None:
        _at_least(flag, value, about.minimum)
    if about.positive:
        _positive(flag, value)


def _check_optimizer(t: TrainConfig) -> None:
    if t.weight_decay is not None and (isinstance(t.weight_decay, bool) or not isinstance(t.weight_decay, (int, float))
                                       or not 0 <= t.weight_decay < float("inf")):
        raise FastlmError(f"--weight-decay must be a finite number of at least 0, got {t.weight_decay!r}")
    if t.betas is None:
        return
    if t.optimizer != "adamw":
        raise FastlmError(f"--betas are AdamW's; add --optimizer adamw or drop --betas (the optimizer is "
                          f"{t.optimizer})")
    betas = list(t.betas) if isinstance(t.betas, (list, tuple)) else None
    if (betas is None or len(betas) != 2 or any(isinstance(b, bool) or not isinstance(b, (int, float))
                                                 or not 0 <= b < 1 for b in betas)):
        raise FastlmError(f"--betas takes two numbers in [0, 1), e.g. 0.9,0.999; got {t.betas!r}")
    t.betas = [float(b) for b in betas]


def _upgraded(values: dict) -> dict:
    """A configuration written by an older fastlm in today's terms: runs saved before --precision existed carry
    ``amp`` ("off": fp32; "bf16": bf16 autocast of the GEMMs, which today's bf16 setting replaces), so that
    their checkpoints still resume and generate."""
    train = values.get("train")
    if not isinstance(train, dict) or "amp" not in train:
        return values
    train = {name: value for name, value in train.items() if name != "amp"}
    train.setdefault("precision", "bf16" if values["train"]["amp"] == "bf16" else "fp32")
    return {**values, "train": train}


def _one_of(flag: str, value, choices: tuple) -> None:
    if value not in choices:
        raise FastlmError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def _at_least(flag: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FastlmError(f"{flag} must be an integer of at least {minimum}, got {value!r}")


def _positive(flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise FastlmError(f"{flag} must be a positive finite number, got {value!r}")


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise FastlmError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FastlmError(f"config file {path} is not valid TOML: {e}") from None


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_toml(config: RunConfig, path: str | Path) -> None:
    """``config`` as a --config file. TOML has no null: a None field is left out, which is right as long as
    None fields default to None (all do)."""
    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{name} = {_toml_value(value)}" for name, value in values.items() if value is not None]
        lines.append("")
    Path(path).write_text("\n".join(lines), encoding="utf-8")
