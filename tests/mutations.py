"""Mutation check: does the test suite notice a wrong training semantics?

Each mutation below is a small, plausible bug in fastlm's source (the lr annealed by /2, a missing dropout,
evaluation that forgets its hidden state, ...). For each one asked for, this script copies the working tree
to a scratch folder, applies the mutation there (the real tree is never touched), runs the tests that should
catch it, and reports whether they did, and how: by an assertion on a wrong number, or only by a crash.

    python tests/mutations.py                 # every mutation (about 10 minutes on 2 cores)
    python tests/mutations.py lr_anneal_half no_output_dropout
    python tests/mutations.py --list

Exit status 0 when every mutation run was caught by at least one failing assertion, 1 otherwise. The text a
mutation replaces must occur exactly once in its file; tests/test_mutations.py checks that in every CI run,
so a refactor that moves the code fails there and the mutation is updated with it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the bug, for people
    path: str  # file, relative to the repository root
    edits: tuple  # (old, new) pairs; each old text occurs exactly once in the file
    tests: tuple  # pytest arguments: the tests that should catch it


ANCHOR = ("tests/test_train_anchor.py", "-k", "cudnn")  # the cudnn cases: each recipe once, ~10 s

MUTATIONS = (
    Mutation("lr_anneal_half", "lr annealed by /2 instead of /4 when validation does not improve",
             "fastlm/train/trainer.py", (("self.step_fn.lr /= 4.0", "self.step_fn.lr /= 2.0"),), ANCHOR),
    Mutation("no_output_dropout", "no dropout on the recurrent stack's output",
             "fastlm/model/rnnlm.py", (("return self.drop(output), state", "return output, state"),),
             ANCHOR),
    Mutation("no_embedding_dropout", "no dropout on the embedding output",
             "fastlm/model/rnnlm.py", (("emb = self.drop(self.encoder(tokens))", "emb = self.encoder(tokens)"),),
             ANCHOR),
    Mutation("no_interlayer_dropout", "layer-by-layer backends leave out torch.nn's dropout between layers",
             "fastlm/cells/base.py",
             (("if layer < self.num_layers - 1 and self.dropout > 0 and self.training:", "if False:"),),
             ("tests/test_train_anchor.py", "-k", "script")),
    Mutation("eval_resets_state", "evaluation restarts the hidden state each batch instead of carrying it",
             "fastlm/train/evaluation.py",
             (("hidden, state = self.model(inputs, state)", "hidden, _ = self.model(inputs, state)"),), ANCHOR),
    Mutation("train_resets_state", "training restarts the hidden state each batch instead of carrying it",
             "fastlm/train/trainer.py",
             (("loss, self.state, tokens = run_step(self.step_fn, batches, self.state, self.timer)",
               "loss, _, tokens = run_step(self.step_fn, batches, self.state, self.timer)"),), ANCHOR),
    Mutation("no_detach", "hidden state not detached between batches",
             "fastlm/model/rnnlm.py", (("return map_state(torch.Tensor.detach, state)", "return state"),),
             ("tests/test_fast_step.py", "tests/test_train_anchor.py", "-k", "cudnn or given")),
    Mutation("loss_drops_last_chunk", "the fused loss drops the last, shorter chunk of tokens",
             "fastlm/model/fused_loss.py",
             (("for start in range(0, num_tokens, chunking.tokens):",
               "for start in range(0, num_tokens - num_tokens % chunking.tokens, chunking.tokens):"),
              # The skipped tokens count as zero loss and zero gradient (not as uninitialised memory).
              ("losses = torch.empty(num_tokens, device=device, dtype=torch.float32)\n    # On CPU one buffer",
               "losses = torch.zeros(num_tokens, device=device, dtype=torch.float32)\n    # On CPU one buffer"),
              ("        d_hidden = torch.empty(num_tokens, hidden.shape[1], device=device, dtype=torch.float32)\n"
               "        d_weight = torch.empty(",
               "        d_hidden = torch.zeros(num_tokens, hidden.shape[1], device=device, dtype=torch.float32)\n"
               "        d_weight = torch.empty(")), ANCHOR),
    Mutation("clip_changed", "gradients clipped at 0.251 instead of 0.25",
             "fastlm/step/fast.py",
             (("clip_grad_norm_(self.params, self.clip,", "clip_grad_norm_(self.params, self.clip * 1.004,"),),
             ANCHOR),
    Mutation("no_clip", "gradients not clipped",
             "fastlm/step/fast.py",
             (("clip_grad_norm_(self.params, self.clip,", "clip_grad_norm_(self.params, 1e30,"),), ANCHOR),
    Mutation("test_last_not_best", "the final test evaluates the last model instead of the best",
             "fastlm/train/checkpoint.py",
             (('trainer.model.load_state_dict(load_checkpoint(trainer.run.best)["model"])', "pass"),), ANCHOR),
    Mutation("validate_on_test", "epochs are validated on the test split",
             "fastlm/train/trainer.py",
             (('val_loss = self.evaluate(self.valid_stream, "valid")\n        if val_loss is None:',
               'val_loss = self.evaluate(self.test_stream, "test")\n        if val_loss is None:'),), ANCHOR),
    Mutation("budget_ends_the_epoch", "a --max-steps/--max-minutes stop validates the cut epoch as if it ended",
             "fastlm/train/trainer.py",
             (("if self.budget.stop_requested() or self.batches_done < self._batches_per_epoch():",
               "if self.budget.stop_requested():"),),
             ("tests/test_budget_pause.py",)),
    Mutation("tests_a_foreign_best", "a run tests whatever best.pt its folder holds",
             "fastlm/train/trainer.py",
             (("if self.best_val_loss is None:  # no validation yet", "if not self.run.best.is_file():  #"),),
             ("tests/test_budget_pause.py",)),
    Mutation("lstm_gate_order", "the reference LSTM reads its gates as f, i, g, o",
             "fastlm/cells/math.py",
             (("i, f, g, o = (gi + gh).chunk(4, dim=1)", "f, i, g, o = (gi + gh).chunk(4, dim=1)"),),
             ("tests/test_cells_parity.py", "-k", "lstm and cudnn")),
    Mutation("rank_columns_strided", "each process takes every W-th batch column instead of a contiguous share",
             "fastlm/distributed.py",
             (("return slice(self.rank * share, (self.rank + 1) * share)",
               "return slice(self.rank, batch_size, self.size)"),),
             ("tests/test_distributed.py", "-k", "one_process and cudnn")),
    Mutation("bf16_decoder_in_fp32", "the bf16 step quietly runs its decoder GEMMs in fp32",
             "fastlm/step/fast.py", (("self.decoder_dtype = compute_dtype(precision)",
                                      "self.decoder_dtype = torch.float32"),),
             ("tests/test_precision.py", "-m", "not slow")),
)


def scratch_copy(destination: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored) in ``destination``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    # The package installs kernels/ as fastlm.kernels; in the copy a link gives imports the same layout.
    (destination / "fastlm" / "kernels").symlink_to(Path("..") / "kernels")


def apply(mutation: Mutation, tree: Path) -> None:
    path = tree / mutation.path
    text = path.read_text(encoding="utf-8")
    for old, new in mutation.edits:
        count = text.count(old)
        if count != 1:
            raise SystemExit(f"mutation {mutation.name}: {old!r} occurs {count} times in {mutation.path}, not "
                             f"once; update the mutation to today's code")
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")


def failures(report: Path) -> list[tuple[str, str]]:
    """(test id, first line of the failure message) of every failed or erroring test in a JUnit report."""
    found = []
    for case in ElementTree.parse(report).iter("testcase"):
        for outcome in list(case.findall("failure")) + list(case.findall("error")):
            message = (outcome.get("message") or "").strip().splitlines()
            found.append((f"{case.get('classname')}::{case.get('name')}", message[0] if message else ""))
    return found


def is_assertion(message: str) -> bool:
    return message.startswith(("AssertionError", "assert ", "Failed: "))


def run(mutation: Mutation) -> tuple[str, str]:
    """(verdict, detail) for one mutation."""
    with tempfile.TemporaryDirectory(prefix=f"fastlm-mutation-{mutation.name}-") as folder:
        tree = Path(folder)
        scratch_copy(tree)
        apply(mutation, tree)
        report = tree / "report.xml"
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        *mutation.tests], cwd=tree, env=env, capture_output=True, text=True)
        if not report.exists():
            return "error", "pytest wrote no report"
        failed = failures(report)
    asserted = [(test, message) for test, message in failed if is_assertion(message)]
    if asserted:
        test, message = asserted[0]
        return "caught", f"{len(asserted)} assertion(s), e.g. {test.rsplit('.', 1)[-1]}: {message[:120]}"
    if failed:
        return "crash only", f"{len(failed)} test(s) crashed, e.g. {failed[0][1][:120]}"
    return "missed", "every test passed"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:24} {m.what}")
        return 0
    unknown = [name for name in args.names if name not in known]
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; see --list")
    chosen = [known[name] for name in args.names] if args.names else list(MUTATIONS)
    print("| mutation | caught? | how |\n| --- | --- | --- |", flush=True)
    all_caught = True
    for mutation in chosen:
        started = time.monotonic()
        verdict, detail = run(mutation)
        all_caught &= verdict == "caught"
        print(f"| {mutation.what} (`{mutation.name}`) | **{verdict}** | {detail} "
              f"({time.monotonic() - started:.0f} s) |", flush=True)
    return 0 if all_caught else 1


if __name__ == "__main__":
    sys.exit(main())
