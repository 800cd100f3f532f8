"""Property-based tests: whatever bytes and flag values users throw at fastlm, they get a correct result or a
one-line error, never a traceback or a hang."""

import io
import math
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlm.data.corpus import load_corpus
from fastlm.errors import FastlmError
from tests.helpers import one_line_error, run_cli

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
GOOD = "the cat sat\non the mat\n" * 400  # long enough for the default bptt at any batch size that fits

line_text = st.text(alphabet=st.sampled_from(list(string.ascii_letters + " \t\x0c\u2028\u00e9\u4e2d\U0001F600")),
                    max_size=40)
text_files = st.one_of(
    st.binary(max_size=300),  # arbitrary bytes: mostly not UTF-8
    st.lists(line_text, max_size=30).map("\n".join),  # unicode, blank lines, no trailing newline
    st.builds(lambda n: "word " * n, st.integers(0, 20000)),  # one very long line
)


def per_line_reference(text: str):
    """The example's tokenisation: lines as file iteration yields them, line.split() + ['<eos>']."""
    lines = io.StringIO(text, newline=None).readlines()
    return [w for line in lines for w in line.split() + ["<eos>"]]


def write_corpus(folder: Path, split: str, content) -> None:
    folder.mkdir(exist_ok=True)
    for name in ("train", "valid", "test"):
        (folder / f"{name}.txt").write_text(GOOD, encoding="utf-8")
    path = folder / f"{split}.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))


@SETTINGS
@given(content=text_files, split=st.sampled_from(["train", "valid", "test"]))
def test_loader_gives_the_example_tokens_or_the_right_error(tmp_path_factory, content, split):
    """Valid UTF-8 with a word in it must load, as the example tokenises it; anything else is a one-line
    error that names the split's file and says what is wrong with it."""
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder, split, content)
    raw = content if isinstance(content, bytes) else content.encode("utf-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or not text.split():
        with pytest.raises(FastlmError) as refused:
            load_corpus(folder, use_cache=False)
        message = str(refused.value)
        assert "\n" not in message and f"{split}.txt" in message
        assert ("not UTF-8" in message) if text is None else ("needs at least one word" in message), message
        return
    corpus = load_corpus(folder, use_cache=False)
    got = [corpus.vocab.idx2word[i] for i in getattr(corpus, split).tolist()]
    assert got == per_line_reference(text)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    for name in ("train", "valid", "test"):
        (folder / f"{name}.txt").write_text(GOOD, encoding="utf-8")
    return folder


numbers = st.one_of(st.integers(-3, 3), st.integers(4, 40), st.integers(10 ** 7, 10 ** 12),
                    st.sampled_from(["nan", "inf", "-1e309", "x", "0.5", "1e-9"]))

# What each flag accepts, given the base command below: tiny_data's 3,200 tokens per split (6 words),
# batch size 20, bptt 35, emsize and nhid 4, --dry-run. Written from the rules, not from fastlm's code.
TOKENS = 3200
INTEGER_FLAGS = {
    "--batch-size": lambda n: 1 <= n <= TOKENS // 36,  # each column needs bptt 35 + 1 rows
    "--eval-batch-size": lambda n: 1 <= n <= TOKENS // 2,  # each column needs an input and a target
    "--bptt": lambda n: 1 <= n <= TOKENS // 20 - 1,  # 160 rows per column at batch size 20
    # Sizes: up to 40 fit easily; 10^7 and more need far more memory than there is (checked below).
    "--emsize": lambda n: 1 <= n <= 40, "--nhid": lambda n: 1 <= n <= 40, "--nlayers": lambda n: 1 <= n <= 40,
    "--epochs": lambda n: n >= 1, "--log-interval": lambda n: n >= 1, "--max-steps": lambda n: n >= 1,
}
FLOAT_FLAGS = {
    "--lr": lambda x: 0 < x < math.inf, "--clip": lambda x: 0 < x < math.inf,
    "--max-minutes": lambda x: 0 < x < math.inf, "--dropout": lambda x: 0 <= x < 1,
}
SMALLEST_TOO_BIG_GB = 80  # emsize 10^7: 3 x 10^7 floats per token x 700 tokens of embedding activations


def expected_to_run(flag: str, value) -> bool:
    """True when the command must succeed, False when it must be refused."""
    try:
        number = int(value) if flag in INTEGER_FLAGS else float(value)
    except ValueError:
        return False
    return {**INTEGER_FLAGS, **FLOAT_FLAGS}[flag](number)


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


@pytest.mark.skipif(available_gb() >= SMALLEST_TOO_BIG_GB, reason="this machine could hold the oversized models")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(sorted({**INTEGER_FLAGS, **FLOAT_FLAGS})), value=numbers)
def test_flag_values_at_and_past_their_limits(tiny_data, tmp_path_factory, flag, value):
    """A valid value runs (exit 0, a run folder with metrics); an invalid one is refused before anything is
    written, with exit status 2 and one line that names the flag."""
    run_dir = tmp_path_factory.mktemp("run") / "r"
    status, _, err = run_cli("train", "--data", tiny_data, "--device", "cpu", "--dry-run", "--emsize", 4,
                             "--nhid", 4, "--run-dir", run_dir, flag, value)
    assert "Traceback" not in err
    if expected_to_run(flag, value):
        assert status == 0, f"{flag} {value} is valid but was refused: {err}"
        assert (run_dir / "metrics.jsonl").exists()
        return
    line = one_line_error(status, err)
    assert flag in line, f"the error does not name {flag}: {line}"
    assert not run_dir.exists()


def test_the_flag_oracle_itself():
    """The rules above, at their edges (a wrong oracle would make the property test meaningless)."""
    assert expected_to_run("--batch-size", "88") and not expected_to_run("--batch-size", "89")
    assert expected_to_run("--eval-batch-size", "1600") and not expected_to_run("--eval-batch-size", "1601")
    assert expected_to_run("--bptt", "159") and not expected_to_run("--bptt", "160")
    assert expected_to_run("--dropout", "0") and not expected_to_run("--dropout", "1")
    assert not expected_to_run("--lr", "nan") and not expected_to_run("--lr", "-1e309")
    assert not expected_to_run("--epochs", "0.5") and expected_to_run("--max-minutes", "1e-9")


@pytest.mark.parametrize("flag, value", [("--batch-size", 88), ("--batch-size", 89), ("--bptt", 159),
                                         ("--bptt", 160), ("--eval-batch-size", 1600), ("--eval-batch-size", 1601)])
def test_data_limits_at_their_edges(tiny_data, tmp_path, flag, value):
    """The largest batch and bptt the data allows run (a dry run of one batch per epoch included); one more
    is a one-line error naming the flag."""
    status, _, err = run_cli("train", "--data", tiny_data, "--device", "cpu", "--dry-run", "--emsize", 4,
                             "--nhid", 4, "--run-dir", tmp_path / "r", flag, value)
    if expected_to_run(flag, value):
        assert status == 0, err
    else:
        assert flag in one_line_error(status, err)


@pytest.mark.parametrize("flag, value", [("--emsize", 10 ** 7), ("--nhid", 10 ** 6), ("--nlayers", 10 ** 12)])
def test_a_run_too_big_for_memory_is_refused_before_allocating(tiny_data, tmp_path, flag, value):
    """Weights or one step's activations beyond the available memory: a one-line error, not an allocator
    crash (or, with overcommit, a machine swapping for an hour). emsize 10^7 on a 5-word corpus is 200 MB of
    weights but 28 GB of embedding output at batch 20, bptt 35."""
    status, _, err = run_cli("train", "--data", tiny_data, "--device", "cpu", "--dry-run",
                             "--run-dir", tmp_path / "r", "--emsize", 4, "--nhid", 4, flag, value)
    line = one_line_error(status, err)
    assert "GiB" in line and "available" in line and flag in line, err
    assert not (tmp_path / "r").exists()
