"""The `fastlm` command line. Heavy imports (torch) happen inside the subcommands so `--help` is instant.

Every user-caused problem ends as one line on stderr, ``fastlm: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from fastlm.errors import FastlmError

# flag dest -> (config section, field)
TRAIN_FLAGS = {
    "cell": ("model", "cell"), "backend": ("model", "backend"), "emsize": ("model", "emsize"),
    "nhid": ("model", "nhid"), "nlayers": ("model", "nlayers"), "dropout": ("model", "dropout"),
    "tied": ("model", "tied"),
    "data": ("data", "data"), "batch_size": ("data", "batch_size"), "eval_batch_size": ("data", "eval_batch_size"),
    "bptt": ("data", "bptt"),
    "lr": ("train", "lr"), "clip": ("train", "clip"), "epochs": ("train", "epochs"), "seed": ("train", "seed"),
    "log_interval": ("train", "log_interval"), "device": ("train", "device"), "max_steps": ("train", "max_steps"),
    "max_minutes": ("train", "max_minutes"), "dry_run": ("train", "dry_run"), "run_dir": ("train", "run_dir"),
    "save": ("train", "save"), "save_minutes": ("train", "save_minutes"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where to look."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # absent flags stay absent, so the config file's values are not overwritten
    p.add_argument("--config", metavar="FILE.toml", default=S, help="TOML file with [model], [data], [train]")
    m = p.add_argument_group("model")
    m.add_argument("--model", "--cell", dest="cell", default=S, type=str.lower,
                   help="lstm (default), gru, rnn_tanh or rnn_relu")
    m.add_argument("--backend", default=S, help="recurrent backend: cudnn (default), reference, script, triton, ...")
    m.add_argument("--emsize", type=int, default=S, help="embedding size (200)")
    m.add_argument("--nhid", type=int, default=S, help="hidden units per layer (200)")
    m.add_argument("--nlayers", type=int, default=S, help="recurrent layers (2)")
    m.add_argument("--dropout", type=float, default=S, help="dropout (0.2)")
    m.add_argument("--tied", action="store_true", default=S, help="tie embedding and decoder weights")
    d = p.add_argument_group("data")
    d.add_argument("--data", default=S, help="wikitext-2 (default), generated, or a folder with train/valid/test.txt")
    d.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=S, help="batch size (20)")
    d.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, default=S, help="eval batch size (10)")
    d.add_argument("--bptt", type=int, default=S, help="sequence length (35)")
    t = p.add_argument_group("training")
    t.add_argument("--lr", type=float, default=S, help="initial learning rate (20)")
    t.add_argument("--clip", type=float, default=S, help="gradient clipping norm (0.25)")
    t.add_argument("--epochs", type=int, default=S, help="epochs (40)")
    t.add_argument("--seed", type=int, default=S, help="random seed (1111)")
    t.add_argument("--log-interval", dest="log_interval", type=int, default=S, help="batches per log line (200)")
    t.add_argument("--device", default=S, help="auto (default), cpu or cuda")
    t.add_argument("--max-steps", dest="max_steps", type=int, default=S, help="stop after this many steps")
    t.add_argument("--max-minutes", dest="max_minutes", type=float, default=S, help="stop after this many minutes")
    t.add_argument("--dry-run", dest="dry_run", action="store_true", default=S,
                   help="a couple of steps of everything, in seconds")
    t.add_argument("--run-dir", dest="run_dir", default=S, help="folder for everything the run writes "
                   "(default runs/<time>-<cell>-<backend>)")
    t.add_argument("--save", default=S, help="also copy the best checkpoint to this path")
    t.add_argument("--save-minutes", dest="save_minutes", type=float, default=S,
                   help="also save 'last' at a log line when this many minutes passed since the last save (10)")


def _add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train an RNN language model (the PyTorch example's recipe, faster)")
    _add_train_flags(train)
    train.add_argument("--resume", metavar="RUN_DIR", default=None,
                       help="continue the run in RUN_DIR exactly where its last.pt left it")


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by fastlm train")
    gen.add_argument("--words", type=int, default=1000, help="number of words (1000)")
    gen.add_argument("--temperature", type=float, default=1.0, help="higher is more diverse (1.0)")
    gen.add_argument("--seed", type=int, default=1111, help="random seed (1111)")
    gen.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    gen.add_argument("--outf", "--out", dest="out", default=None, help="write here instead of stdout (UTF-8)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fastlm", description="Train, profile and benchmark word-level RNN language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for add_parser in (_add_train_parser, _add_generate_parser):
        add_parser(sub)
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict:
    """{section: {field: value}} for the train flags given on the command line (absent ones are absent)."""
    overrides: dict = {}
    for dest, (section, name) in TRAIN_FLAGS.items():
        if hasattr(args, dest):
            overrides.setdefault(section, {})[name] = getattr(args, dest)
    return overrides


def config_from_args(args: argparse.Namespace):
    from fastlm.config import RunConfig, load_toml

    config = RunConfig()
    if getattr(args, "config", None):
        config.update(load_toml(args.config), origin=f"config file {args.config}")
    config.update(overrides_from_args(args), origin="command line")
    return config.validate()


def cmd_train(args) -> int:
    from fastlm.launch import run_training

    if args.resume is not None:
        if getattr(args, "config", None):
            raise FastlmError("--resume takes the run's own configuration; drop --config")
        return run_training(None, resume_dir=args.resume, overrides=overrides_from_args(args))
    return run_training(config_from_args(args))


def cmd_generate(args) -> int:
    from fastlm.generate import generate
    from fastlm.train import resolve_device

    text = generate(args.checkpoint, args.words, args.temperature, args.seed, resolve_device(args.device))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.buffer.write(text.encode("utf-8"))
        sys.stdout.flush()
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except FastlmError as e:
        print(f"fastlm: error: {e}", file=sys.stderr)
        return getattr(e, "exit_status", 2)
    except KeyboardInterrupt:
        print("fastlm: interrupted", file=sys.stderr)
        return 130
