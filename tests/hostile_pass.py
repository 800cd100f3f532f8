"""A hostile pass over fastlm's reliability classes (issue 23), as an attacker and a careless user would try them:
``python tests/hostile_pass.py [WORK_DIR]``. Not collected by pytest (minutes of subprocesses); the tests of
each class are in test_run_lock.py, test_late_kill.py and test_untrusted_inputs.py.

Every case runs real `fastlm` processes on a toy corpus and is classed as
    ok          it did what it should (a run that should succeed succeeded with the right result)
    one-line    refused with exactly one line `fastlm: error: ...` (or the processes' lines under --nproc)
    traceback   a Python traceback reached the user
    hang        it ran past its time limit
    lost/wrong  a result was lost or wrong (two writers at once, a missing test record, a wrong number, a
                process left running, a point marked failed for good, ...)
and the pass prints each case and the counts per class. Exit status 1 when any case is a traceback, a hang
or a lost/wrong result.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.helpers import toy_corpus, write_corpus_folder  # noqa: E402

PY = sys.executable
TINY = ["--emsize", "16", "--nhid", "16", "--batch-size", "4", "--bptt", "8", "--device", "cpu"]
RESULTS: list[tuple[str, str, str, str]] = []  # (class, case, verdict, detail)


def fastlm(*args, timeout=180, preexec_fn=None, cwd=None) -> tuple[int | None, str, str]:
    """(exit status or None on a hang, stdout, stderr)."""
    try:
        result = subprocess.run([PY, "-m", "fastlm", *map(str, args)], capture_output=True, text=True,
                                timeout=timeout, preexec_fn=preexec_fn, cwd=cwd or ROOT)
        return result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired as expired:
        return None, expired.stdout or "", expired.stderr or ""


def verdict_of(status, err, expect_error: bool, words=()) -> tuple[str, str]:
    if status is None:
        return "hang", "timed out"
    if "Traceback" in err:
        return "traceback", err.strip().splitlines()[-1][:160]
    lines = [line for line in err.splitlines() if line.strip()]
    if expect_error:
        if status == 2 and lines and all(line.startswith("fastlm: error: ") for line in lines) and len(set(lines)) == 1:
            missing = [w for w in words if w not in lines[0]]
            if missing:
                return "lost/wrong", f"line lacks {missing}: {lines[0]}"
            return "one-line", lines[0][15:140]
        return "lost/wrong", f"expected a one-line refusal, got status {status}: {err.strip()[-200:]}"
    return ("ok", "") if status == 0 else ("lost/wrong", f"status {status}: {err.strip()[-200:]}")


def case(klass: str, name: str, verdict: str, detail: str = "") -> None:
    RESULTS.append((klass, name, verdict, detail))
    print(f"{verdict:10s} {klass:22s} {name:44s} {detail}", flush=True)


def refusal(klass, name, *args, words=(), timeout=180, **kw):
    status, _, err = fastlm(*args, timeout=timeout, **kw)
    case(klass, name, *verdict_of(status, err, True, words))


def success(klass, name, *args, timeout=180, check=None, **kw):
    status, out, err = fastlm(*args, timeout=timeout, **kw)
    verdict, detail = verdict_of(status, err, False)
    if verdict == "ok" and check is not None:
        problem = check(out)
        if problem:
            verdict, detail = "lost/wrong", problem
    case(klass, name, verdict, detail)


def records(run: Path, kind: str | None = None) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    found = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if kind is None or record.get("kind") == kind:
            found.append(record)
    return found


def wait_for(predicate, timeout=240) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "fastlm", *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


KILL_IN_FINAL_TEST = """
import os, signal, sys
from fastlm.cli import main
from fastlm.train.trainer import Trainer
evaluate = Trainer.evaluate
def killed(self, stream, split, interruptible=True, batches=None):
    if split == "test" and not interruptible:
        os.kill(os.getpid(), signal.SIGKILL)
    return evaluate(self, stream, split, interruptible, batches)
Trainer.evaluate = killed
sys.exit(main(sys.argv[1:]))
"""


# ------------------------------------------------------------------------------------------------------ classes

def locks(work: Path, data: Path) -> None:
    k = "lock"
    long_run = ["train", "--data", data, *TINY, "--epochs", "1000"]
    run = work / "lock-run"
    first = start(*long_run, "--run-dir", run)
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists())
        for name, args in (("second train, same --run-dir", (*long_run, "--run-dir", run)),
                           ("second train with --overwrite", (*long_run, "--run-dir", run, "--overwrite")),
                           ("--resume while it trains", ("train", "--resume", run))):
            refusal(k, name, *args, words=(f"process {first.pid}",))
        wait_for(lambda: (run / "last.pt").exists())
        two = [start("train", "--resume", run, "--epochs", "1001") for _ in range(2)]
        outcomes = [p.wait(timeout=240) for p in two]
        errs = [p.stderr.read() for p in two]
        if all(o == 2 and "in use by process" in e and "Traceback" not in e for o, e in zip(outcomes, errs)):
            case(k, "two --resume at once while it trains", "one-line", "both refused")
        else:
            case(k, "two --resume at once while it trains", "lost/wrong", f"{outcomes} {errs}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The killed holder's lock does not block; two resumes at once: one runs, one is refused.
    two = [start("train", "--resume", run, "--max-steps", "10000") for _ in range(2)]
    time.sleep(8)
    states = [p.poll() for p in two]
    refused = [p for p in two if p.poll() == 2]
    running = [p for p in two if p.poll() is None]
    for p in running:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=240)
    if len(refused) == 1 and len(running) == 1:
        case(k, "two --resume at once (stale lock of a killed run)", "one-line", "one ran, one was refused")
    else:
        case(k, "two --resume at once (stale lock of a killed run)", "lost/wrong", f"states {states}")
    steps = [r["step"] for r in records(run, "log")]
    case(k, "no interleaved metrics after all that", "ok" if steps == sorted(steps) and len(steps) == len(set(steps))
         else "lost/wrong", "" if steps == sorted(steps) else f"steps {steps[:20]}")
    # Two sweeps on one folder.
    sweep = ["sweep", "--data", data, *TINY, "--cells", "lstm,gru", "--epochs", "1", "--steps-per-epoch", "200"]
    out = work / "lock-sweep"
    first = start(*sweep, "--out", out)
    try:
        wait_for(lambda: (out / "sweep.json").exists())
        refusal(k, "second sweep on the same --out", *sweep, "--out", out, words=("in use by process",))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def late_kills(work: Path, data: Path) -> None:
    k = "late kill"
    train = ["train", "--data", data, *TINY, "--epochs", "2", "--steps-per-epoch", "8", "--log-interval", "4"]
    straight, killed = work / "straight", work / "killed"
    fastlm(*train, "--run-dir", straight)
    expected = records(straight, "test")
    subprocess.run([PY, "-c", KILL_IN_FINAL_TEST, *map(str, train), "--run-dir", str(killed)], cwd=ROOT,
                   capture_output=True, timeout=240)

    def same_test(_out):
        got = records(killed, "test")
        if len(got) != 1 or not expected or got[0]["test_ppl"] != expected[0]["test_ppl"]:
            return f"test records {got} against {expected}"
        return None

    success(k, "SIGKILL in the final test, then --resume", "train", "--resume", killed, check=same_test)
    refusal(k, "--resume of the finished run", "train", "--resume", killed, words=("tested its best model",))
    # A kill at random moments of a short run, resumed until it finishes: same test ppl, no duplicate epochs.
    for delay in (2.0, 3.5, 5.0):
        run = work / f"random-kill-{delay}"
        proc = start(*train, "--run-dir", run)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for _ in range(3):
            if records(run, "test"):
                break
            if (run / "last.pt").exists():
                fastlm("train", "--resume", run)
            else:
                fastlm(*train, "--run-dir", run)
        got = records(run, "test")
        epochs = [r["epoch"] for r in records(run, "epoch")]
        good = len(got) == 1 and expected and got[0]["test_ppl"] == expected[0]["test_ppl"] and epochs == [1, 2]
        case(k, f"SIGKILL after {delay} s, resumed to the end", "ok" if good else "lost/wrong",
             "" if good else f"tests {got}, epochs {epochs}")
    # A killed sweep leaves no point training, and its rerun finishes every point.
    out = work / "killed-sweep"
    sweep = ["sweep", "--data", data, *TINY, "--cells", "lstm,gru", "--epochs", "1", "--steps-per-epoch", "400",
             "--out", out]
    proc = start(*sweep)
    wait_for(lambda: any((out / "points").glob("*/last.pt")) or any((out / "points").glob("*/metrics.jsonl")))
    time.sleep(1)
    points = subprocess.run(["pgrep", "-f", "--", f"--run-dir {out}"], capture_output=True, text=True).stdout.split()
    points += subprocess.run(["pgrep", "-f", "--", f"--resume {out}"], capture_output=True, text=True).stdout.split()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone = wait_for(lambda: not any(alive(int(pid)) for pid in points), timeout=120)
    case(k, "SIGKILL of fastlm sweep: its points stop", "ok" if gone and points else "lost/wrong",
         f"{len(points)} point process(es)")
    success(k, "the killed sweep's rerun finishes", *sweep,
            check=lambda _o: None if all(p["status"] == "done" for p in json.loads((out / "sweep.json").read_text())
                                         ["points"]) else (out / "sweep.json").read_text()[:300])


def folders(work: Path, data: Path, trained: Path, other: Path) -> None:
    k = "run folder"

    def copy(name):
        target = work / name
        shutil.copytree(trained, target)
        return target

    run = copy("foreign-last")
    shutil.copy(other / "last.pt", run / "last.pt")
    refusal(k, "last.pt of another model", "train", "--resume", run, "--epochs", 5, words=("model.nhid",))
    run = copy("foreign-best")
    shutil.copy(other / "best.pt", run / "best.pt")
    refusal(k, "best.pt of another model", "train", "--resume", run, "--epochs", 5, words=("model.nhid",))
    for name, content in (("garbage", b"garbage"), ("a list", b"[1, 2]"), ("not UTF-8", b'{"a": "\xff"}'),
                          ("no sections", b'{"resumes": []}')):
        run = copy(f"config-{name.replace(' ', '-')}")
        (run / "config.json").write_bytes(content)
        refusal(k, f"config.json {name}", "train", "--resume", run, "--epochs", 5, words=("config.json",))
    run = copy("config-deleted")
    (run / "config.json").unlink()
    success(k, "config.json deleted: resume", "train", "--resume", run, "--epochs", 3)
    success(k, "config.json deleted: report after the resume", "report", run, "--out", work / "config-deleted-report")
    refusal(k, "--resume with another --run-dir", "train", "--resume", trained, "--run-dir", work / "elsewhere",
            words=("names another",))
    refusal(k, "--resume with --eval-batches changed", "train", "--resume", trained, "--eval-batches", 2,
            "--epochs", 5, words=("--eval-batches",))
    (work / "a-file").write_text("x")
    os.symlink(work / "loop", work / "loop")
    for name, run_dir in (("--run-dir a file", work / "a-file"), ("--run-dir a symlink loop", work / "loop"),
                          ("--run-dir below a file", work / "a-file" / "run"), ('--run-dir ""', "")):
        refusal(k, name, "train", "--data", data, *TINY, "--dry-run", "--run-dir", run_dir, words=("--run-dir",))
    refusal(k, "--resume of a missing folder", "train", "--resume", work / "nowhere", words=("no such folder",))
    # Killed before its first checkpoint: re-run works, resume says why not.
    run = work / "no-checkpoint"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {}, "data": {}, "train": {}}))
    (run / "metrics.jsonl").write_text("")
    refusal(k, "resume of a run killed before its first save", "train", "--resume", run,
            words=("before its first checkpoint",))
    success(k, "re-run of a run killed before its first save", "train", "--data", data, *TINY, "--dry-run",
            "--run-dir", run)
    # Temporary files of killed writes are removed, records written after the checkpoint are not duplicated.
    run = copy("after-kill")
    (run / ".last.pt.x1.tmp").write_bytes(b"partial")
    step = torch.load(run / "last.pt", weights_only=True)["step"]
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "log", "step": step + 2, "epoch": 3, "batch": 2, "loss": 1.0}) + "\n{\"kind\": ")

    def clean(_out):
        steps = [r["step"] for r in records(run, "log")]
        if list(run.glob(".*.tmp")):
            return "temporary files left"
        return None if len(steps) == len(set(steps)) else f"duplicate log steps {steps}"

    success(k, "resume after a kill: no tmp files, no duplicates", "train", "--resume", run, "--epochs", 3,
            check=clean)
    # The free-space check does not ask for room the existing checkpoints already take.
    run = copy("space")
    success(k, "resume asks only for the room it needs", "train", "--resume", run, "--epochs", 3)


def checkpoints(work: Path, trained: Path) -> None:
    k = "checkpoint"
    base = torch.load(trained / "best.pt", weights_only=True)
    changes = {
        "config a string": lambda p: p.__setitem__("config", "x"),
        "config a list": lambda p: p.__setitem__("config", [1]),
        "negative nhid": lambda p: p["config"]["model"].__setitem__("nhid", -5),
        "zero layers": lambda p: p["config"]["model"].__setitem__("nlayers", 0),
        "nhid a string": lambda p: p["config"]["model"].__setitem__("nhid", "16"),
        "dropout NaN": lambda p: p["config"]["model"].__setitem__("dropout", float("nan")),
        "unknown cell": lambda p: p["config"]["model"].__setitem__("cell", "transformer"),
        "unknown config key": lambda p: p["config"]["model"].__setitem__("heads", 8),
        "10^9 layers": lambda p: p["config"]["model"].__setitem__("nlayers", 10**9),
        "10^9 hidden units": lambda p: p["config"]["model"].__setitem__("nhid", 10**9),
        "10^12 emsize": lambda p: p["config"]["model"].__setitem__("emsize", 10**12),
        "NaN weights": lambda p: p["model"]["rnn.weight_hh_l0"].__setitem__((0, 0), float("nan")),
        "inf weights": lambda p: p["model"]["decoder.bias"].__setitem__(0, float("inf")),
        "vocabulary of integers": lambda p: p.__setitem__("vocab", list(range(len(p["vocab"])))),
        "vocabulary altered": lambda p: p["vocab"].__setitem__(3, "zzz"),
        "vocabulary digest altered": lambda p: p.__setitem__("vocab_digest", "0" * 64),
        "vocabulary with a repeat": lambda p: p["vocab"].__setitem__(1, p["vocab"][0]),
        "weights missing": lambda p: p["model"].pop("encoder.weight"),
        "weights of another shape": lambda p: p["model"].__setitem__("encoder.weight", torch.zeros(3, 3)),
        "weights not tensors": lambda p: p.__setitem__("model", {"encoder.weight": [1, 2]}),
        "no format": lambda p: p.pop("format"),
        "another version": lambda p: p.__setitem__("version", 99),
    }
    for name, change in changes.items():
        payload = copy.deepcopy(base)
        change(payload)
        path = work / f"crafted-{len(RESULTS)}.pt"
        torch.save(payload, path)
        refusal(k, f"generate: {name}", "generate", "--checkpoint", path, "--words", 3, timeout=60)
        run = work / f"crafted-run-{len(RESULTS)}"
        shutil.copytree(trained, run)
        shutil.copy(path, run / "last.pt")
        refusal(k, f"resume: {name}", "train", "--resume", run, "--epochs", 5, timeout=60)
    for name, change in (("epoch a string", lambda p: p.__setitem__("epoch", "1")),
                         ("negative step", lambda p: p.__setitem__("step", -1)),
                         ("hidden of another shape", lambda p: p.__setitem__("hidden", torch.zeros(2))),
                         ("rng missing", lambda p: p.pop("rng")),
                         ("lr NaN", lambda p: p.__setitem__("lr", float("nan")))):
        payload = torch.load(trained / "last.pt", weights_only=True)
        change(payload)
        run = work / f"state-run-{len(RESULTS)}"
        shutil.copytree(trained, run)
        torch.save(payload, run / "last.pt")
        refusal(k, f"resume: {name}", "train", "--resume", run, "--epochs", 5, timeout=60)
    garbage = work / "random.pt"
    garbage.write_bytes(os.urandom(10000))
    refusal(k, "random bytes", "generate", "--checkpoint", garbage, words=("corrupt",))
    (work / "empty.pt").write_bytes(b"")
    refusal(k, "an empty file", "generate", "--checkpoint", work / "empty.pt")
    refusal(k, "a folder", "generate", "--checkpoint", work)

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {work / 'pwned'}",))

    torch.save({"format": "fastlm-checkpoint", "version": 1, "x": RunsCode()}, work / "evil.pt")
    refusal(k, "a pickle that runs code", "generate", "--checkpoint", work / "evil.pt", words=("refused",))
    if (work / "pwned").exists():
        case(k, "the code did not run", "lost/wrong", "it ran")


def flags_and_paths(work: Path, data: Path, trained: Path) -> None:
    k = "flags and paths"
    best = trained / "best.pt"
    refusal(k, "train --seed 2^64", "train", "--data", data, *TINY, "--seed", 2**64, "--dry-run", "--run-dir",
            work / "s1", words=("--seed",))
    refusal(k, "train --seed -1", "train", "--data", data, *TINY, "--seed", -1, "--dry-run", "--run-dir", work / "s2")
    refusal(k, "generate --seed 2^64", "generate", "--checkpoint", best, "--seed", 2**64, words=("--seed",))
    for temperature in ("1e-300", "5e-324", "1e-45"):
        success(k, f"generate --temperature {temperature}", "generate", "--checkpoint", best, "--words", 30,
                "--temperature", temperature, check=lambda out: None if len(out.split()) == 30 else out[:100])
    for temperature in ("inf", "nan", "0", "-1"):
        refusal(k, f"generate --temperature {temperature}", "generate", "--checkpoint", best, "--temperature",
                temperature, words=("--temperature",))
    (work / "file").write_text("x")
    for name, out in (("a folder", work), ("parent missing", work / "no" / "x.txt"),
                      ("parent a file", work / "file" / "x.txt")):
        refusal(k, f"generate --out {name}", "generate", "--checkpoint", best, "--out", out, words=("--out",))
    for name, out in (("a folder", work), ("parent a file", work / "file" / "x.jsonl")):
        refusal(k, f"bench --out {name}", "bench", "--device", "cpu", "--mode", "fwd", "--cell", "lstm", "--backend",
                "cudnn", "--shape", "2,2,4,4", "--repeat", 1, "--out", out, words=("--out",))
    refusal(k, "profile --out a file", "profile", "--data", data, *TINY, "--steps", 1, "--warmup", 1,
            "--trace-steps", 0, "--out", work / "file")
    refusal(k, "--save into a file's folder", "train", "--data", data, *TINY, "--dry-run", "--run-dir", work / "sv",
            "--save", work / "file" / "best.pt", words=("--save",))

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    refusal(k, "ulimit -f during a checkpoint", "train", "--data", data, *TINY, "--nhid", 64, "--dry-run",
            "--run-dir", work / "ulimit", preexec_fn=limit, words=("ulimit -f",))

    def tiny_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))

    refusal(k, "ulimit -f during config.json/metrics", "train", "--data", data, *TINY, "--dry-run", "--run-dir",
            work / "ulimit2", preexec_fn=tiny_limit)


def reports(work: Path, trained: Path) -> None:
    k = "report"
    cases = {
        "config.json a list": ("config.json", b"[1]"),
        "config.json not UTF-8": ("config.json", b'{"x": "\xff"}'),
        "config.json {}": ("config.json", b"{}"),
        "config.json sections lists": ("config.json", b'{"model": [], "data": [], "train": []}'),
        "config.json resumes damaged": ("config.json", b'{"model": {"cell": "lstm"}, "data": {}, "train": {}, '
                                                       b'"resumes": [{"changed": {"epochs": 3}}]}'),
    }
    for name, (file, content) in cases.items():
        run = work / f"report-{len(RESULTS)}"
        shutil.copytree(trained, run)
        (run / file).write_bytes(content)
        refusal(k, name, "report", run, "--out", work / f"report-out-{len(RESULTS)}")
    for name, content in (("metrics not UTF-8", b"\xff\xfe\x00\n"),
                          ("metrics records without fields", b'{"kind": "epoch"}\n{"kind": "log"}\n{"kind": "test"}\n'),
                          ("metrics of the wrong types",
                           b'{"kind": "epoch", "epoch": "1", "val_ppl": "x"}\n[1]\n"a"\n'),
                          ("metrics Infinity", b'{"kind": "epoch", "epoch": 1, "val_ppl": Infinity}\n')):
        run = work / f"report-{len(RESULTS)}"
        shutil.copytree(trained, run)
        with (run / "metrics.jsonl").open("ab") as f:
            f.write(content)
        success(k, name, "report", run, "--out", work / f"report-out-{len(RESULTS)}")
    for name, sweep in (("sweep.json a list", [1]), ("sweep.json points a string", {"format": "fastlm-sweep",
                                                                                   "points": "x"}),
                        ("sweep.json point run_dir a number", {"format": "fastlm-sweep", "points": [
                            {"name": "a", "run_dir": 3}]}),
                        ("sweep.json grid a list", {"format": "fastlm-sweep", "grid": [], "points": []})):
        folder = work / f"sweep-{len(RESULTS)}"
        folder.mkdir()
        (folder / "sweep.json").write_text(json.dumps(sweep))
        refusal(k, name, "report", folder)
    folder = work / "sweep-missing-point"
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps({"format": "fastlm-sweep", "version": 1, "grid": {
        "cells": ["lstm"], "axes": {}}, "base": {}, "budget": {}, "points": [
        {"name": "lstm", "cell": "lstm", "settings": {}, "run_dir": "points/lstm", "status": "done"}]}))
    success(k, "a sweep point's folder deleted", "report", folder,
            check=lambda _o: None if "is missing" in (folder / "report.md").read_text() else "not named")


def distributed(work: Path, trained: Path) -> None:
    k = "--nproc"
    run = work / "nproc-nan"
    shutil.copytree(trained, run)
    payload = torch.load(run / "last.pt", weights_only=True)
    payload["model"]["encoder.weight"][0, 0] = float("nan")
    torch.save(payload, run / "last.pt")
    status, _, err = fastlm("train", "--resume", run, "--epochs", 5, "--nproc", 2, timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    good = status == 2 and lines and all(line.startswith("fastlm: error:") for line in lines)
    case(k, "a rank's error under --nproc 2", "one-line" if good else ("traceback" if "Traceback" in err else
                                                                      "lost/wrong"), lines[0][:120] if lines else "")
    run = work / "nproc-int"
    proc = subprocess.Popen([PY, "-m", "fastlm", "train", "--data", str(work / "data"), *TINY, "--epochs", "1000",
                             "--run-dir", str(run), "--nproc", "2"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 0)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
        verdict = "traceback" if "Traceback" in err else ("ok" if proc.returncode == 130 else "lost/wrong")
        case(k, "Ctrl-C to --nproc 2", verdict, f"status {proc.returncode}")
    except subprocess.TimeoutExpired:
        proc.kill()
        case(k, "Ctrl-C to --nproc 2", "hang")


def main() -> int:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="fastlm-hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FASTLM_CACHE_DIR", str(work / "cache"))
    data = work / "data"
    data.mkdir(exist_ok=True)
    write_corpus_folder(toy_corpus(), data)
    trained, other = work / "trained", work / "other"
    fastlm("train", "--data", data, *TINY, "--epochs", 2, "--steps-per-epoch", 6, "--run-dir", trained)
    fastlm("train", "--data", data, *TINY, "--nhid", 24, "--epochs", 1, "--steps-per-epoch", 3, "--run-dir", other)
    started = time.monotonic()
    parts = {"locks": lambda: locks(work, data), "late_kills": lambda: late_kills(work, data),
             "folders": lambda: folders(work, data, trained, other), "checkpoints": lambda: checkpoints(work, trained),
             "flags_and_paths": lambda: flags_and_paths(work, data, trained), "reports": lambda: reports(work, trained),
             "distributed": lambda: distributed(work, trained)}
    chosen = os.environ.get("HOSTILE_PARTS")  # e.g. HOSTILE_PARTS=late_kills,reports: only those
    for name, part in parts.items():
        if not chosen or name in chosen.split(","):
            part()
    counts = {}
    for _, _, verdict, _ in RESULTS:
        counts[verdict] = counts.get(verdict, 0) + 1
    print(f"\n{len(RESULTS)} cases in {time.monotonic() - started:.0f} s: " + ", ".join(
        f"{counts.get(v, 0)} {v}" for v in ("ok", "one-line", "traceback", "hang", "lost/wrong")))
    by_class = {}
    for klass, _, verdict, _ in RESULTS:
        by_class.setdefault(klass, {}).setdefault(verdict, 0)
        by_class[klass][verdict] += 1
    for klass, seen in by_class.items():
        print(f"  {klass:18s} " + ", ".join(f"{n} {v}" for v, n in seen.items()))
    bad = sum(counts.get(v, 0) for v in ("traceback", "hang", "lost/wrong"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
