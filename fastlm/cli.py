"""The `fastlm` command line. Heavy imports (torch) happen inside the subcommands so `--help` is instant.

The run settings' flags (train, profile, sweep, and bench's step settings) are made from the fields of
fastlm.config (fastlm.flags): a flag is its field's dest, and ``TRAIN_FLAGS`` maps each one back to its
section. Options of one subcommand only (bench --shape, sweep --quick, ...) are written here, plainly.
Every user-caused problem ends as one line on stderr, ``fastlm: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import sys

from fastlm.config import (
    CELLS,
    COMPARED_CELLS,
    PRECISIONS,
    SECTION_TITLES,
    VARIANTS,
    int_list,
    setting_fields,
)
from fastlm.errors import FastlmError
from fastlm.flags import add_setting_flags
from fastlm.memory import keep_freed_memory

# flag dest (= field name) -> (config section, field), for every run setting
TRAIN_FLAGS = {f.name: (section, f.name) for section, f in setting_fields()}
# The run settings `fastlm bench` takes for its step cases (the cases set cell, backend, sizes and precision).
BENCH_SETTINGS = ("nlayers", "dropout", "tied", "decoder", "cuda_graphs")


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


def _add_train_flags(p: argparse.ArgumentParser, names=None, group=None, more_flags=None) -> None:
    """The run settings' flags (all of them, or the fields ``names``), after --config when they are all there."""
    if names is None:
        p.add_argument("--config", metavar="FILE.toml", default=argparse.SUPPRESS,
                       help="TOML file with [model], [data], [train]")
    fields = [(section, f) for section, f in setting_fields() if names is None or f.name in names]
    add_setting_flags(p, fields, SECTION_TITLES, group=group, more_flags=more_flags)


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
    gen.add_argument("--words", type=int, default=1000, help="number of words (%(default)s)")
    gen.add_argument("--temperature", type=float, default=1.0, help="higher is more diverse (%(default)s)")
    gen.add_argument("--seed", type=int, default=1111, help="random seed (%(default)s)")
    gen.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    gen.add_argument("--outf", "--out", dest="out", default=None, help="write here instead of stdout (UTF-8)")


def _add_export_parser(sub) -> None:
    export = sub.add_parser("export", help="write a run's best model as ONNX (needs the [onnx] extra)",
                            description="Writes the best model of a run (its best.pt) as an ONNX file: tokens [T, B] "
                                        "and the hidden state in, log-probabilities [T, B, V] and the new state out, "
                                        "T and B free.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by fastlm train")
    export.add_argument("--onnx", required=True, metavar="PATH", help="where to write the ONNX file")


def _shape(text: str) -> tuple:
    values = int_list(text)
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
    bench.add_argument("--cell", type=_names, default=list(COMPARED_CELLS), metavar="CELL[,CELL]",
                       help=f"{', '.join(CELLS)} (default {','.join(COMPARED_CELLS)})")
    bench.add_argument("--backend", type=_names, default=None, metavar="NAME[,NAME]",
                       help="recurrent backends (default: every one available here, on CPU but triton and compile; "
                            "step mode adds 'example')")
    bench.add_argument("--mode", type=_names, default=["fwd", "fwdbwd", "step"], metavar="MODE[,MODE]",
                       help="fwd, fwdbwd, step (default all three)")
    bench.add_argument("--shape", type=_shape, action="append", default=None, metavar="T,B,E,H",
                       help="repeatable (default the example's: 35,20,200,200 35,20,650,650 35,20,1500,1500; "
                            "on CPU the first two)")
    bench.add_argument("--precision", type=_names, default=["fp32"], metavar=_one_or_more(PRECISIONS),
                       help="fp32 (default, exact: TF32 off), tf32 (TF32 GEMMs and recurrence), bf16 (cells: the "
                            "stack in bf16; step: the decoder's GEMMs in bf16), auto (step: bf16 where the device "
                            "has bf16 matrix units); the example's step stays exact fp32")
    bench.add_argument("--variant", type=_names, default=["auto"], metavar=_one_or_more(VARIANTS),
                       help="the triton backend's time loops to time, each a row (default auto: what it picks)")
    bench.add_argument("--launch", type=_names, default=["eager"], metavar="eager[,graph]",
                       help="fwd/fwdbwd: eager (default) launches from Python every call; graph captures the call "
                            "once as a CUDA graph and replays it (kernel time without launch cost; CUDA only)")
    bench.add_argument("--repeat", type=int, default=None, help="timed calls per case (30 on CUDA, 5 on CPU)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed calls first (5 on CUDA, 1 on CPU)")
    bench.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    bench.add_argument("--vocab", type=int, default=33_278, help="step: vocabulary size (%(default)s, Wikitext-2's)")
    bench.add_argument("--loss-chunk", dest="loss_chunk", type=int_list, default=None, metavar="TOKENS,BLOCK",
                       help="step: the fused loss's tokens per chunk and vocabulary columns per GEMM (0: all), "
                            "instead of the device's default")
    bench.add_argument("--compile-baseline", dest="compile_baseline", action=argparse.BooleanOptionalAction,
                       default=None, help="step: also time the example under torch.compile and bf16 autocast (row "
                                          "compile-bf16; default: when --precision includes bf16)")
    bench.add_argument("--out", default=None, metavar="FILE.jsonl",
                       help="append results here (default bench/results/<time>-<device>.jsonl)")
    model = bench.add_argument_group("model", "fastlm train's settings: the layers for every mode, the rest for the "
                                              "step cases (each case sets cell, backend, sizes and precision)")
    _add_train_flags(bench, BENCH_SETTINGS, group=model, more_flags={"nlayers": ("--layers",)})


def _one_or_more(names: tuple) -> str:
    """A metavar for a comma-separated list of ``names``: fp32[,tf32,bf16,auto]."""
    return f"{names[0]}[,{','.join(names[1:])}]"


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
                   help="steps before measuring (%(default)s); the first one's cost (compilation, autotuning) is "
                        "reported apart")
    p.add_argument("--steps", type=int, default=20, metavar="N", help="measured steps (%(default)s)")
    p.add_argument("--trace-steps", dest="trace_steps", type=int, default=3, metavar="K",
                   help="further steps recorded by torch.profiler into trace.json.gz (%(default)s; 0 for none)")
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
                   help=f"the cells to compare ({','.join(COMPARED_CELLS)}; rnn_tanh and rnn_relu compare the "
                        "non-linearity)")
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


def overrides_from_args(args: argparse.Namespace, names=None) -> dict:
    """{section: {field: value}} for the run settings (all, or the fields ``names``) given on the command line
    (absent ones are absent)."""
    overrides: dict = {}
    for dest, (section, name) in TRAIN_FLAGS.items():
        if hasattr(args, dest) and (names is None or name in names):
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
    # validates it (sizes, cell and backend come from each case; bench's own --cell, --backend, ... are lists).
    base = RunConfig()
    base.update(overrides_from_args(args, BENCH_SETTINGS), origin="command line")
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
    keep_freed_memory()
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
