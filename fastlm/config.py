"""Run configuration: dataclasses per component, a TOML file, and command-line overrides.

Precedence, lowest first: the dataclass defaults (the PyTorch word_language_model example's defaults),
then ``--config FILE.toml`` (sections ``[model]``, ``[data]``, ``[train]`` with the field names below),
then flags given on the command line. ``to_dict()`` is what a run folder's ``config.json`` holds and what a
checkpoint carries, so a run can be rebuilt from it; ``write_toml`` writes a configuration back as a
``--config`` file (what `fastlm profile --py-spy` and `fastlm sweep` hand to the runs they start).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import tomllib

from fastlm.errors import FastlmError

# The precision settings (fastlm.precision says what each does; kept here too so that reading a config
# does not import torch).
PRECISIONS = ("fp32", "tf32", "bf16", "auto")

# Seeds: torch's generators take [0, 2^64); fastlm adds the rank (and a step) to a seed, so it takes [0, 2^63).
MAX_SEED = 2**63 - 1

# The recurrent cells fastlm knows, in one place (fastlm.cells.math holds their math, in this order).
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
# The optimizers (fastlm.step.optimizer builds them): "sgd" is the example's p -= lr * grad.
OPTIMIZERS = ("sgd", "adamw")
# The kernel variants a backend may offer (today the triton backend's); "auto" is every backend's default.
VARIANTS = ("auto", "per-step", "persistent")
# When the lr is annealed (fastlm.train.lr_rule says why; kept here too so that reading a config imports no torch).
LR_RULES = ("example", "noise", "noise-final")


@dataclass
class ModelConfig:
    cell: str = "lstm"
    backend: str = "cudnn"
    emsize: int = 200
    nhid: int = 200
    nlayers: int = 2
    dropout: float = 0.2
    tied: bool = False
    decoder: str = "full"  # "adaptive": an adaptive softmax, a different (smaller, faster) model
    cutoffs: Optional[list] = None  # adaptive softmax clusters; None: Wikitext-2's (2000, 10000), scaled
    variant: str = "auto"  # the triton backend's time loop: per-step, persistent, or auto (fastlm.cells.triton)


@dataclass
class DataConfig:
    data: str = "wikitext-2"
    batch_size: int = 20
    eval_batch_size: int = 10
    bptt: int = 35
    # "memory": token ids held in memory; "stream": read from the token cache through a memory map (corpora
    # bigger than memory); "auto": stream above fastlm.data.STREAM_ABOVE_BYTES of text. Same batches either way.
    data_mode: str = "auto"


@dataclass
class TrainConfig:
    lr: float = 20.0
    clip: float = 0.25
    optimizer: str = "sgd"  # or "adamw" (the example's --use-optimizer): fastlm.step.optimizer
    weight_decay: Optional[float] = None  # None: the optimizer's own default (SGD 0, AdamW 0.01, as torch)
    betas: Optional[list] = None  # AdamW's [beta1, beta2]; None: torch's [0.9, 0.999]
    epochs: int = 40
    seed: int = 1111
    log_interval: int = 200
    device: str = "auto"
    max_steps: Optional[int] = None
    max_minutes: Optional[float] = None
    dry_run: bool = False
    run_dir: Optional[str] = None
    save: Optional[str] = None
    save_minutes: float = 10.0  # also save 'last' at a log line once this long has passed since the last save
    step: str = "fast"  # "example": the PyTorch example's loop as it is, the baseline of every speed-up
    precision: str = "fp32"  # fp32 (exact), tf32, bf16 or auto: fastlm.precision (tf32 and bf16 change the numbers)
    cuda_graphs: bool = True  # on CUDA, capture the fast step's fixed-shape steps once and replay them
    skip_nonfinite: int = 0  # skip up to this many batches with a non-finite loss or gradients, then stop
    steps_per_epoch: Optional[int] = None  # an epoch of this many batches, continuing through the corpus
    eval_batches: Optional[int] = None  # evaluate on the first this many batches of valid and test
    threads: Optional[int] = None  # torch's CPU threads (None: torch's default)
    state: str = "carry"  # "reset": every chunk starts from a zero hidden state (the ablation of carrying it)
    lr_rule: str = "example"  # when to anneal: one of LR_RULES (fastlm.train.lr_rule says what each does)
    dist_timeout: float = 300.0  # several processes: seconds a collective waits for a missing process


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
        """Check value ranges that do not need the data; raises FastlmError naming the flag."""
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
        _at_least("--emsize", m.emsize, 1)
        _at_least("--nhid", m.nhid, 1)
        _at_least("--nlayers", m.nlayers, 1)
        if isinstance(m.dropout, bool) or not isinstance(m.dropout, (int, float)) or not 0.0 <= m.dropout < 1.0:
            raise FastlmError(f"--dropout must be in [0, 1), got {m.dropout}")
        if m.tied and m.emsize != m.nhid:
            raise FastlmError(f"--tied needs --emsize equal to --nhid, got emsize {m.emsize} and nhid {m.nhid}")
        _one_of("--decoder", m.decoder, ("full", "adaptive"))
        _one_of("--variant", m.variant, VARIANTS)
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
        _at_least("--batch-size", d.batch_size, 1)
        _at_least("--eval-batch-size", d.eval_batch_size, 1)
        _at_least("--bptt", d.bptt, 1)
        _one_of("--data-mode", d.data_mode, ("auto", "memory", "stream"))
        if isinstance(t.seed, bool) or not isinstance(t.seed, int) or not 0 <= t.seed <= MAX_SEED:
            raise FastlmError(f"--seed must be an integer from 0 to 2^63-1, got {t.seed!r}")
        _positive("--lr", t.lr)
        _positive("--clip", t.clip)
        _check_optimizer(t)
        _at_least("--epochs", t.epochs, 1)
        _at_least("--log-interval", t.log_interval, 1)
        if t.max_steps is not None:
            _at_least("--max-steps", t.max_steps, 1)
        if t.max_minutes is not None:
            _positive("--max-minutes", t.max_minutes)
        for flag, value in (("--run-dir", t.run_dir), ("--save", t.save)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise FastlmError(f"{flag} must name a path, got {value!r}")
        _positive("--save-minutes", t.save_minutes)
        _positive("--dist-timeout", t.dist_timeout)
        if not re.fullmatch(r"auto|cpu|(cuda|xpu|mps)(:\d+)?", str(t.device)):
            raise FastlmError(f"--device must be auto, cpu, or an accelerator: cuda, xpu or mps (cuda:1 for one of "
                              f"several), got {t.device!r}")
        _one_of("--step", t.step, ("fast", "example"))
        _one_of("--state", t.state, ("carry", "reset"))
        _one_of("--precision", t.precision, PRECISIONS)
        _one_of("--lr-rule", t.lr_rule, LR_RULES)
        if not isinstance(t.cuda_graphs, bool):
            raise FastlmError(f"cuda_graphs must be true or false, got {t.cuda_graphs!r}")
        _at_least("--skip-nonfinite", t.skip_nonfinite, 0)
        for flag, value in (("--steps-per-epoch", t.steps_per_epoch), ("--eval-batches", t.eval_batches),
                            ("--threads", t.threads)):
            if value is not None:
                _at_least(flag, value, 1)
        if t.step == "example" and (m.backend != "cudnn" or m.decoder != "full" or t.precision not in ("fp32", "tf32")
                                    or t.skip_nonfinite):
            raise FastlmError("--step example is the PyTorch example's loop as it is: it needs --backend cudnn, "
                              "--decoder full, --precision fp32 or tf32 and no --skip-nonfinite")
        return self


def _check_optimizer(t: TrainConfig) -> None:
    _one_of("--optimizer", t.optimizer, OPTIMIZERS)
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
