"""The `fastlm` command line. Heavy imports (torch) happen inside the subcommands so `--help` is instant.

Every user-caused problem ends as one line on stderr, ``fastlm: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import sys

from fastlm.config import LR_RULES, PRECISIONS
from fastlm.errors import FastlmError

# flag dest -> (config section, field)
TRAIN_FLAGS = {
    "cell": ("model", "cell"), "backend": ("model", "backend"), "emsize": ("model", "emsize"),
    "nhid": ("model", "nhid"), "nlayers": ("model", "nlayers"), "dropout": ("model", "dropout"),
    "tied": ("model", "tied"), "decoder": ("model", "decoder"), "cutoffs": ("model", "cutoffs"),
    "variant": ("model", "variant"),
    "data": ("data", "data"), "batch_size": ("data", "batch_size"), "eval_batch_size": ("data", "eval_batch_size"),
    "bptt": ("data", "bptt"), "data_mode": ("data", "data_mode"),
    "lr": ("train", "lr"), "clip": ("train", "clip"), "optimizer": ("train", "optimizer"),
    "weight_decay": ("train", "weight_decay"), "betas": ("train", "betas"), "epochs": ("train", "epochs"),
    "seed": ("train", "seed"),
    "log_interval": ("train", "log_interval"), "device": ("train", "device"), "max_steps": ("train", "max_steps"),
    "max_minutes": ("train", "max_minutes"), "dry_run": ("train", "dry_run"), "run_dir": ("train", "run_dir"),
    "save": ("train", "save"), "save_minutes": ("train", "save_minutes"),
    "step": ("train", "step"), "precision": ("train", "precision"), "cuda_graphs": ("train", "cuda_graphs"),
    "skip_nonfinite": ("train", "skip_nonfinite"), "steps_per_epoch": ("train", "steps_per_epoch"),
    "eval_batches": ("train", "eval_batches"), "threads": ("train", "threads"), "state": ("train", "state"),
    "dist_timeout": ("train", "dist_timeout"), "lr_rule": ("train", "lr_rule"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where to look, and a flag is only ever
    taken by its full name: an abbreviation (--epoch for --epochs) is an unknown flag, not a silent guess.

    A subcommand's parser hands the words it does not know to the top-level parser, whose own error would point
    at `fastlm --help`, which lists no subcommand's flags; so ``parse_args`` has the subcommand's parser say it,
    naming its own --help and the closest flag it has."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            commands = getattr(self, "commands", {})
            parser = commands.get(getattr(namespace, "command", None), self)
            parser.error(unknown_arguments(unknown, parser))
        return namespace


def unknown_arguments(words: list[str], parser: argparse.ArgumentParser) -> str:
    """The message for ``words`` that ``parser`` does not take: the first unknown flag's closest known one."""
    message = f"unrecognized arguments: {' '.join(words)}"
    flags = [word.split("=", 1)[0] for word in words if word.startswith("--")]
    known = [option for option in parser._option_string_actions if option.startswith("--")]
    for flag in flags:
        close = difflib.get_close_matches(flag, known, n=1)
        if close:
            return f"{message}; did you mean {close[0]}?"
    return message


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # absent flags stay absent, so the config file's values are not overwritten
    p.add_argument("--config", metavar="FILE.toml", default=S, help="TOML file with [model], [data], [train]")
    m = p.add_argument_group("model")
    m.add_argument("--model", "--cell", dest="cell", default=S, type=str.lower,
                   help="lstm (default), gru, rnn_tanh or rnn_relu")
    m.add_argument("--backend", default=S, help="recurrent backend: cudnn (default), reference, script, triton, ...")
    m.add_argument("--variant", default=S, choices=("auto", "per-step", "persistent"),
                   help="triton backend: one kernel launch per time step, or one persistent launch per layer "
                        "walking all steps (auto: persistent where it should be faster; see README)")
    m.add_argument("--emsize", type=int, default=S, help="embedding size (200)")
    m.add_argument("--nhid", type=int, default=S, help="hidden units per layer (200)")
    m.add_argument("--nlayers", type=int, default=S, help="recurrent layers (2)")
    m.add_argument("--dropout", type=float, default=S, help="dropout (0.2)")
    m.add_argument("--tied", action="store_true", default=S, help="tie embedding and decoder weights")
    m.add_argument("--decoder", default=S, choices=("full", "adaptive"),
                   help="full softmax (default), or adaptive: an adaptive softmax, a different model (opt-in)")
    m.add_argument("--cutoffs", type=_int_list, default=S, metavar="C1,C2,...",
                   help="adaptive softmax clusters by frequency rank (default 2000,10000: Wikitext-2's, scaled)")
    d = p.add_argument_group("data")
    d.add_argument("--data", default=S, help="wikitext-2 (default), generated, or a folder with train/valid/test.txt")
    d.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=S, help="batch size (20)")
    d.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, default=S, help="eval batch size (10)")
    d.add_argument("--bptt", type=int, default=S, help="sequence length (35)")
    d.add_argument("--data-mode", dest="data_mode", default=S, choices=("auto", "memory", "stream"),
                   help="hold the token ids in memory, or stream them from the token cache (corpora bigger than "
                        "memory); auto (default) streams above 128 MiB of text")
    t = p.add_argument_group("training")
    t.add_argument("--lr", type=float, default=S, help="initial learning rate (20)")
    t.add_argument("--lr-rule", dest="lr_rule", default=S, choices=LR_RULES,
                   help="when to divide the lr by 4 after an epoch: example (default) when validation did not "
                        "improve; noise only when it got worse by more than its standard error (short epochs); "
                        "noise-final the noise rule, and once more before the last epoch")
    t.add_argument("--clip", type=float, default=S, help="gradient clipping norm (0.25)")
    t.add_argument("--optimizer", default=S, choices=("sgd", "adamw"),
                   help="sgd (default): the example's p -= lr * grad; adamw: torch's AdamW (fused kernels where the "
                        "device has them; give it a small --lr, e.g. 1e-3)")
    t.add_argument("--use-optimizer", dest="optimizer", action="store_const", const="adamw", default=S,
                   help="the PyTorch example's spelling of --optimizer adamw")
    t.add_argument("--weight-decay", dest="weight_decay", type=float, default=S,
                   help="decoupled weight decay for adamw (0.01), L2 for sgd (0)")
    t.add_argument("--betas", type=_float_pair, default=S, metavar="B1,B2", help="AdamW's betas (0.9,0.999)")
    t.add_argument("--epochs", type=int, default=S, help="epochs (40)")
    t.add_argument("--seed", type=int, default=S, help="random seed (1111)")
    t.add_argument("--log-interval", dest="log_interval", type=int, default=S, help="batches per log line (200)")
    t.add_argument("--device", default=S,
                   help="auto (default: torch's current accelerator, CUDA, XPU or MPS, else the CPU), cpu, cuda, xpu, "
                        "mps (cuda:1 for one of several)")
    t.add_argument("--accel", dest="device", action="store_const", const="auto", default=S,
                   help="the PyTorch example's spelling of --device auto")
    t.add_argument("--max-steps", dest="max_steps", type=int, default=S,
                   help="pause once the run has done this many steps in all (resume to go on)")
    t.add_argument("--max-minutes", dest="max_minutes", type=float, default=S,
                   help="pause after this many minutes of this invocation (resume to go on)")
    t.add_argument("--dry-run", dest="dry_run", action="store_true", default=S,
                   help="a couple of steps of everything, in seconds")
    t.add_argument("--run-dir", dest="run_dir", default=S, help="folder for everything the run writes "
                   "(default runs/<time>-<cell>-<backend>)")
    t.add_argument("--save", default=S, help="also copy the best checkpoint to this path")
    t.add_argument("--save-minutes", dest="save_minutes", type=float, default=S,
                   help="also save 'last' at a log line when this many minutes passed since the last save (10)")
    t.add_argument("--steps-per-epoch", dest="steps_per_epoch", type=int, default=S, metavar="N",
                   help="an epoch of N batches (validation and the lr schedule after each), continuing through the "
                        "corpus from where the last epoch stopped; default: one pass over the training split")
    t.add_argument("--eval-batches", dest="eval_batches", type=int, default=S, metavar="N",
                   help="validate and test on the first N batches of valid and test only (quicker, said so in reports)")
    t.add_argument("--threads", type=int, default=S, metavar="N", help="torch's CPU threads (default: torch's)")
    t.add_argument("--state", default=S, choices=("carry", "reset"),
                   help="carry (default, the example's): the hidden state goes on from chunk to chunk, detached; "
                        "reset: each chunk starts from zeros, in training and evaluation (what carrying is worth)")
    t.add_argument("--skip-nonfinite", dest="skip_nonfinite", type=int, default=S, metavar="N",
                   help="skip up to N batches whose loss or gradients are NaN/inf (no update), recorded in "
                        "metrics; the next one stops the run (0: stop at the first)")
    f = p.add_argument_group("speed")
    f.add_argument("--step", default=S, choices=("fast", "example"),
                   help="fast (default), or example: the PyTorch example's loop as it is (the baseline)")
    f.add_argument("--precision", default=S, choices=PRECISIONS,
                   help="fp32 (default): exact, TF32 off everywhere; tf32: GEMMs and the recurrence may use TF32; "
                        "bf16: the decoder's GEMMs in bf16, the rest fp32; auto: bf16 where the device has bf16 "
                        "matrix units, else fp32 (tf32 and bf16 change the numbers)")
    f.add_argument("--cuda-graphs", dest="cuda_graphs", action=argparse.BooleanOptionalAction, default=S,
                   help="on CUDA, capture fixed-shape steps once as a CUDA graph and replay them (on)")
    f.add_argument("--dist-timeout", dest="dist_timeout", type=float, default=S, metavar="SECONDS",
                   help="several processes: how long one waits for another before the run stops (300)")


def _add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train an RNN language model (the PyTorch example's recipe, faster)")
    _add_train_flags(train)
    train.add_argument("--resume", metavar="RUN_DIR", default=None,
                       help="continue the run in RUN_DIR exactly where its last.pt left it (a pause at the "
                            "--max-steps/--max-minutes budget, a signal, a crash)")
    train.add_argument("--overwrite", action="store_true",
                       help="start a new run in a --run-dir that holds one, replacing its files")
    train.add_argument("--onnx-export", dest="onnx_export", metavar="PATH", default=None,
                       help="at the end, also write the best model as ONNX there (as fastlm export; needs the "
                            "[onnx] extra)")
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="train on N processes of this machine (one per GPU, or CPU processes with gloo): "
                            "starts torchrun for you; on several machines run torchrun yourself (README)")


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by fastlm train")
    gen.add_argument("--words", type=int, default=1000, help="number of words (1000)")
    gen.add_argument("--temperature", type=float, default=1.0, help="higher is more diverse (1.0)")
    gen.add_argument("--seed", type=int, default=1111, help="random seed (1111)")
    gen.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    gen.add_argument("--outf", "--out", dest="out", default=None, help="write here instead of stdout (UTF-8)")


def _add_export_parser(sub) -> None:
    export = sub.add_parser("export", help="write a run's best model as ONNX (needs the [onnx] extra)",
                            description="Writes the best model of a run (its best.pt) as an ONNX file: tokens [T, B] "
                                        "and the hidden state in, log-probabilities [T, B, V] and the new state out, "
                                        "T and B free.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by fastlm train")
    export.add_argument("--onnx", required=True, metavar="PATH", help="where to write the ONNX file")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_pair(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, e.g. 0.9,0.999; got {text!r}")
    return values


def _shape(text: str) -> tuple:
    values = _int_list(text)
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected T,B,E,H (four positive integers), got {text!r}")
    return tuple(values)


def _names(text: str) -> list[str]:
    return [v.strip().lower() for v in text.split(",") if v.strip()]


def _add_bench_parser(sub) -> None:
    bench = sub.add_parser(
        "bench", help="time recurrent cells and the training step against their baselines",
        description="Times the recurrent stack (fwd, fwdbwd; baseline cudnn = torch.nn) and the whole training "
                    "step (step; baseline: the PyTorch example's loop, fp32) in one run, prints a table with "
                    "speedups and appends each result as a JSON line to --out.")
    bench.add_argument("--cell", type=_names, default=["lstm", "gru"], metavar="CELL[,CELL]",
                       help="lstm, gru, rnn_tanh, rnn_relu (default lstm,gru)")
    bench.add_argument("--backend", type=_names, default=None, metavar="NAME[,NAME]",
                       help="recurrent backends (default: every one available here, on CPU but triton and compile; "
                            "step mode adds 'example')")
    bench.add_argument("--mode", type=_names, default=["fwd", "fwdbwd", "step"], metavar="MODE[,MODE]",
                       help="fwd, fwdbwd, step (default all three)")
    bench.add_argument("--shape", type=_shape, action="append", default=None, metavar="T,B,E,H",
                       help="repeatable (default the example's: 35,20,200,200 35,20,650,650 35,20,1500,1500; "
                            "on CPU the first two)")
    bench.add_argument("--precision", type=_names, default=["fp32"], metavar="fp32[,tf32,bf16,auto]",
                       help="fp32 (default, exact: TF32 off), tf32 (TF32 GEMMs and recurrence), bf16 (cells: the "
                            "stack in bf16; step: the decoder's GEMMs in bf16), auto (step: bf16 where the device "
                            "has bf16 matrix units); the example's step stays exact fp32")
    bench.add_argument("--variant", type=_names, default=["auto"], metavar="auto[,per-step,persistent]",
                       help="the triton backend's time loops to time, each a row (default auto: what it picks)")
    bench.add_argument("--launch", type=_names, default=["eager"], metavar="eager[,graph]",
                       help="fwd/fwdbwd: eager (default) launches from Python every call; graph captures the call "
                            "once as a CUDA graph and replays it (kernel time without launch cost; CUDA only)")
    bench.add_argument("--repeat", type=int, default=None, help="timed calls per case (30 on CUDA, 5 on CPU)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed calls first (5 on CUDA, 1 on CPU)")
    bench.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    bench.add_argument("--nlayers", "--layers", dest="nlayers", type=int, default=2, help="recurrent layers (2)")
    bench.add_argument("--vocab", type=int, default=33_278, help="step: vocabulary size (33278, Wikitext-2's)")
    bench.add_argument("--dropout", type=float, default=0.2, help="step: dropout (0.2)")
    bench.add_argument("--tied", action="store_true", help="step: tie embedding and decoder weights (needs E == H)")
    bench.add_argument("--decoder", default="full", choices=("full", "adaptive"),
                       help="step: the fast step's decoder (full; adaptive is a different model)")
    bench.add_argument("--cuda-graphs", dest="cuda_graphs", action=argparse.BooleanOptionalAction, default=True,
                       help="step: CUDA graphs for the fast step on CUDA (on)")
    bench.add_argument("--loss-chunk", dest="loss_chunk", type=_int_list, default=None, metavar="TOKENS,BLOCK",
                       help="step: the fused loss's tokens per chunk and vocabulary columns per GEMM (0: all), "
                            "instead of the device's default")
    bench.add_argument("--compile-baseline", dest="compile_baseline", action=argparse.BooleanOptionalAction,
                       default=None, help="step: also time the example under torch.compile and bf16 autocast (row "
                                          "compile-bf16; default: when --precision includes bf16)")
    bench.add_argument("--out", default=None, metavar="FILE.jsonl",
                       help="append results here (default bench/results/<time>-<device>.jsonl)")


def _add_profile_parser(sub) -> None:
    prof = sub.add_parser(
        "profile", help="where each millisecond of a training step goes: table, JSON, picture, traces",
        description="Runs warm-up plus measured steps of exactly the step `fastlm train` runs (same flags) and "
                    "writes breakdown.json/.md, flow.svg/.png and trace.json.gz. Flags that bound a training run "
                    "(--epochs, --max-steps, --max-minutes, --dry-run, --log-interval, --run-dir, --save) do not "
                    "apply here.")
    _add_train_flags(prof)
    p = prof.add_argument_group("profile")
    p.add_argument("--warmup", type=int, default=5, metavar="W",
                   help="steps before measuring (5); the first one's cost (compilation, autotuning) is reported apart")
    p.add_argument("--steps", type=int, default=20, metavar="N", help="measured steps (20)")
    p.add_argument("--trace-steps", dest="trace_steps", type=int, default=3, metavar="K",
                   help="further steps recorded by torch.profiler into trace.json.gz (3; 0 for none)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (profiles/<time>-<cell>-<backend>)")
    tools = p.add_mutually_exclusive_group()
    tools.add_argument("--py-spy", dest="py_spy", action="store_true",
                       help="re-run under py-spy record: a speedscope JSON and a flame-graph SVG")
    tools.add_argument("--nsys", action="store_true",
                       help="re-run under Nsight Systems, capturing only the measured steps (needs nsys and CUDA)")


def _add_sweep_parser(sub) -> None:
    sweep = sub.add_parser(
        "sweep", help="train a grid of runs (e.g. LSTM against GRU over layers and sizes) and report on them",
        description="Trains one run per cell and combination of --set values, each an ordinary `fastlm train` in "
                    "its own folder under --out, then writes report.md/.json and plots. Run the same command again "
                    "to finish an interrupted sweep. The train flags set what every point shares.")
    _add_train_flags(sweep)
    s = sweep.add_argument_group("sweep")
    s.add_argument("--out", required=True, metavar="DIR", help="the sweep's folder")
    s.add_argument("--cells", type=_names, default=None, metavar="CELL[,CELL]",
                   help="the cells to compare (lstm,gru; rnn_tanh and rnn_relu compare the non-linearity)")
    s.add_argument("--set", dest="axes", action="append", default=[], metavar="FIELD=V1,V2",
                   help="an axis of the grid: any training setting and its values (repeatable), e.g. nlayers=1,2")
    s.add_argument("--set-cell", dest="cell_settings", action="append", default=[], metavar="CELL:FIELD=VALUE",
                   help="a setting for one cell's points only (repeatable), e.g. gru:lr=5")
    s.add_argument("--grid", metavar="FILE.toml", default=None,
                   help="cells, [axes], [per_cell.CELL], design and seeds from a file")
    s.add_argument("--design", choices=("ofat", "grid"), default=None,
                   help="ofat (default): a baseline (the train flags' values) and one setting varied at a time; "
                        "grid: every combination")
    s.add_argument("--seeds", default=None, metavar="N|S1,S2",
                   help="train every point with N seeds (from --seed on) or with the seeds listed: replicates whose "
                        "spread the report compares the cells' differences with")
    s.add_argument("--jobs", type=int, default=None, help="points trained at once (1; a preset's own)")
    s.add_argument("--devices", type=_names, default=None, metavar="DEV[,DEV]",
                   help="devices the jobs take in turn, e.g. cuda:0,cuda:1 (default: --device)")
    s.add_argument("--max-minutes-per-run", dest="max_minutes_per_run", type=float, default=None, metavar="M",
                   help="pause each point after M minutes of each invocation (its report then says so)")
    s.add_argument("--quick", action="store_true",
                   help="the LSTM-vs-GRU study in <= 20 minutes on a 2-core CPU (fastlm.sweep.presets says what it "
                        "runs); flags still override")
    s.add_argument("--standard", action="store_true",
                   help="the same study with longer training, <= 2 hours on a 2-core CPU; flags still override")


def _add_report_parser(sub) -> None:
    report = sub.add_parser("report", help="compare runs: tables, plots, and the conditions of every number",
                            description="Writes report.md, report.json and plots/ for a sweep folder or any run "
                                        "folders (LSTM and GRU side by side per varied setting).")
    report.add_argument("folders", nargs="+", metavar="DIR", help="sweep folders or run folders")
    report.add_argument("--out", default=None, metavar="DIR", help="where to write (default: the one DIR given)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fastlm", description="Train, profile and benchmark word-level RNN language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for add_parser in (_add_train_parser, _add_generate_parser, _add_export_parser, _add_profile_parser,
                       _add_bench_parser, _add_sweep_parser, _add_report_parser):
        add_parser(sub)
    parser.commands = sub.choices  # name -> its parser: unknown flags are its to name (OneLineParser.parse_args)
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict:
    """{section: {field: value}} for the train flags given on the command line (absent ones are absent)."""
    overrides: dict = {}
    for dest, (section, name) in TRAIN_FLAGS.items():
        if hasattr(args, dest):
            overrides.setdefault(section, {})[name] = getattr(args, dest)
    return overrides


def config_from_args(args: argparse.Namespace, preset: dict | None = None):
    """The validated RunConfig of a command: the defaults, a preset's settings (e.g. sweep --quick), then the
    --config file, then the flags."""
    from fastlm.config import RunConfig, load_toml

    config = RunConfig()
    if preset:
        config.update(preset, origin="preset")
    if getattr(args, "config", None):
        config.update(load_toml(args.config), origin=f"config file {args.config}")
    config.update(overrides_from_args(args), origin="command line")
    return config.validate()


def cmd_train(args) -> int:
    from fastlm.train.command import run_training

    if args.onnx_export is not None:  # said before training, not after it
        from fastlm.train.checkpoint import check_writable
        from fastlm.train.onnx_export import check_onnx_installed

        check_onnx_installed()
        check_writable(args.onnx_export, "--onnx-export")
    if args.nproc is not None:
        if args.resume is None:  # what the number of processes must fit, said before torchrun starts
            check_for_processes(config_from_args(args), args.nproc)
        return launch_processes(args.nproc, args.argv)
    if args.resume is not None:
        if getattr(args, "config", None):
            raise FastlmError("--resume takes the run's own configuration; drop --config")
        if args.overwrite:
            raise FastlmError("--resume continues the run in its folder and --overwrite replaces it; choose one")
        return run_training(None, resume_dir=args.resume, overrides=overrides_from_args(args),
                            onnx_export=args.onnx_export)
    return run_training(config_from_args(args), overwrite=args.overwrite, onnx_export=args.onnx_export)


def check_for_processes(config, nproc: int) -> None:
    """FastlmError when a run cannot be shared among ``nproc`` processes (said once, before they start)."""
    from fastlm.distributed import World

    if nproc < 1:
        raise FastlmError(f"--nproc must be at least 1, got {nproc}")
    world = World(0, nproc, 0)
    world.columns(config.data.batch_size)
    world.columns(config.data.eval_batch_size, "--eval-batch-size")
    if nproc > 1 and config.train.step == "example":
        raise FastlmError("--step example is the PyTorch example's loop in one process; use --step fast with --nproc")
    if nproc > 1 and config.model.decoder == "adaptive":
        raise FastlmError("--decoder adaptive does not run on several processes yet; use one process")
    if config.train.save:
        from fastlm.train.checkpoint import check_writable

        check_writable(config.train.save, "--save")


def launch_processes(nproc: int, argv: list[str]) -> int:
    """`fastlm train --nproc N ...`: the same command in N processes under torchrun (without --nproc).

    torchrun runs in a session of its own, and a Ctrl-C or SIGTERM sent here is passed on to it once; this
    process waits for it to end (it gives the workers time to save), so no worker outlives the command."""
    import signal
    import subprocess

    from fastlm.distributed import launched_by_torchrun, torchrun_command

    if launched_by_torchrun():
        raise FastlmError("--nproc starts torchrun itself; under torchrun leave it out")
    argv = _without_option(argv, "--nproc")
    if nproc == 1:
        return main(argv)
    from fastlm.train.signals import EXIT_STATUS

    launcher = subprocess.Popen(torchrun_command(nproc, argv), start_new_session=True)
    received = []

    def pass_on(signum, frame):
        received.append(signum)
        launcher.send_signal(signum)

    previous = {signum: signal.signal(signum, pass_on) for signum in EXIT_STATUS}
    try:
        status = launcher.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # torchrun ends with 1 when a signal stopped it; say which signal, as one process would (130, 143).
    return EXIT_STATUS[received[0]] if received and status != 0 else status


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (given as two words or as option=value)."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == option:
            skip = True
        elif not word.startswith(option + "="):
            kept.append(word)
    return kept


def cmd_generate(args) -> int:
    from fastlm.device import resolve_device
    from fastlm.paths import check_output_file, writing
    from fastlm.train.generate import check_options, generate

    check_options(args.words, args.temperature, args.seed)
    if args.out:  # refused before the model is loaded and the words sampled
        check_output_file(args.out, "--out")
    text = generate(args.checkpoint, args.words, args.temperature, args.seed, resolve_device(args.device))
    if args.out:
        with writing(args.out, "--out"), open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.buffer.write(text.encode("utf-8"))
        sys.stdout.flush()
    return 0


def cmd_export(args) -> int:
    from fastlm.train.onnx_export import export_run

    best = export_run(args.run_dir, args.onnx)
    print(f"exported {best} to {args.onnx} (ONNX)")
    return 0


def cmd_profile(args) -> int:
    from fastlm.profile.command import ProfileOptions, run_profile

    options = ProfileOptions(warmup=args.warmup, steps=args.steps, trace_steps=args.trace_steps, out=args.out,
                             py_spy=args.py_spy, nsys=args.nsys)
    return run_profile(config_from_args(args), options)


def cmd_bench(args) -> int:
    from fastlm.benchmark.command import BenchOptions, StepSettings, run_bench
    from fastlm.config import RunConfig

    if args.vocab < 2:
        raise FastlmError(f"--vocab must be at least 2, got {args.vocab}")
    if args.loss_chunk is not None and (len(args.loss_chunk) != 2 or args.loss_chunk[0] < 1 or args.loss_chunk[1] < 0):
        raise FastlmError("--loss-chunk takes TOKENS,BLOCK: tokens per chunk (at least 1) and vocabulary columns "
                          "per GEMM (0 for all)")
    # The step cases start from the training configuration these flags describe, validated as `fastlm train`
    # validates it (sizes, cell and backend come from each case).
    base = RunConfig()
    model = {"nlayers": args.nlayers, "dropout": args.dropout, "tied": args.tied, "decoder": args.decoder}
    base.update({"model": model, "train": {"cuda_graphs": args.cuda_graphs}}, origin="command line")
    step = StepSettings(base=base.validate(), vocab=args.vocab,
                        loss_chunk=tuple(args.loss_chunk) if args.loss_chunk else None)
    options = BenchOptions(cells=args.cell, backends=args.backend, modes=args.mode,
                           shapes=args.shape, precisions=args.precision, launches=args.launch,
                           variants=args.variant, repeat=args.repeat,
                           warmup=args.warmup, device=args.device, threads=args.threads, step=step, out=args.out,
                           compile_baseline=args.compile_baseline)
    return run_bench(options)


def cmd_sweep(args) -> int:
    from pathlib import Path

    import shlex

    from fastlm.sweep.command import SweepOptions, run_sweep
    from fastlm.sweep.grid import Grid, add_cell_setting, add_setting, grid_from_toml, parse_seeds
    from fastlm.sweep.presets import PRESETS

    if hasattr(args, "run_dir"):
        raise FastlmError("--run-dir is not a sweep flag: each point gets a folder under --out")
    if hasattr(args, "max_minutes"):
        raise FastlmError("--max-minutes is per run in a sweep: use --max-minutes-per-run")
    if args.quick and args.standard:
        raise FastlmError("--quick and --standard are two presets; choose one")
    preset = PRESETS["quick" if args.quick else "standard"] if args.quick or args.standard else None
    if preset and args.grid:
        raise FastlmError("a preset (--quick, --standard) is a grid of its own; drop it or --grid")
    grid = grid_from_toml(args.grid) if args.grid else preset.grid() if preset else Grid(design="ofat")
    if args.cells:
        grid.cells = args.cells
    if args.design:
        grid.design = args.design
    for text in args.axes:
        add_setting(grid, text)
    for text in args.cell_settings:
        add_cell_setting(grid, text)
    base = config_from_args(args, preset=preset.settings if preset else None)
    if args.seeds is not None:
        grid.seeds = parse_seeds(args.seeds, base.train.seed)
    options = SweepOptions(out=Path(args.out), grid=grid, base=base, jobs=args.jobs if args.jobs is not None else
                           preset.jobs if preset else 1, devices=args.devices or [],
                           max_minutes_per_run=args.max_minutes_per_run, preset=preset.describe() if preset else None,
                           command=shlex.join(["fastlm", *args.argv]))
    return run_sweep(options)


def cmd_report(args) -> int:
    from pathlib import Path

    from fastlm.report.command import run_report

    if args.out is None and len(args.folders) > 1:
        raise FastlmError("several folders: say where the report goes with --out DIR")
    out = Path(args.out or args.folders[0])
    run_report([Path(folder) for folder in args.folders], out)
    print(f"report: {out / 'report.md'}")
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "export": cmd_export, "profile": cmd_profile,
            "bench": cmd_bench,
            "sweep": cmd_sweep, "report": cmd_report}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # as given: --nproc hands it to torchrun
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except FastlmError as e:
        print(f"fastlm: error: {e}", file=sys.stderr)
        return getattr(e, "exit_status", 2)
    except OSError as e:  # a file problem no check foresaw: still one line naming the file (fastlm.paths)
        from fastlm.paths import describe_os_error

        print(f"fastlm: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastlm: interrupted", file=sys.stderr)
        return 130
