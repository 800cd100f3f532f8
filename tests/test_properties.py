"""Property-based tests: whatever bytes and flag values users throw at fastlm, they get a correct result or a
one-line error, never a traceback or a hang."""

import io
import string
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlm.cli import main
from fastlm.data.corpus import load_corpus
from fastlm.errors import FastlmError

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
def test_loader_gives_the_example_tokens_or_one_line_error(tmp_path_factory, content, split):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder, split, content)
    try:
        corpus = load_corpus(folder, use_cache=False)
    except FastlmError as e:
        assert "\n" not in str(e) and split in str(e)
        return
    raw = content if isinstance(content, bytes) else content.encode("utf-8")
    expected = per_line_reference(raw.decode("utf-8"))
    got = [corpus.vocab.idx2word[i] for i in getattr(corpus, split).tolist()]
    assert got == expected


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:  # argparse exits on bad flag syntax
            status = e.code
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    for name in ("train", "valid", "test"):
        (folder / f"{name}.txt").write_text(GOOD, encoding="utf-8")
    return folder


numbers = st.one_of(st.integers(-3, 3), st.integers(4, 40), st.integers(10 ** 7, 10 ** 12),
                    st.sampled_from(["nan", "inf", "-1e309", "x", "0.5", "1e-9"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["--batch-size", "--bptt", "--emsize", "--nhid", "--nlayers", "--epochs", "--lr",
                             "--clip", "--dropout", "--log-interval", "--max-steps", "--max-minutes",
                             "--eval-batch-size"]),
       value=numbers)
def test_flag_values_at_and_past_their_limits(tiny_data, tmp_path_factory, flag, value):
    run_dir = tmp_path_factory.mktemp("run") / "r"
    status, out, err = run_cli(["train", "--data", str(tiny_data), "--device", "cpu", "--dry-run",
                                "--emsize", "4", "--nhid", "4", "--run-dir", str(run_dir), flag, str(value)])
    assert "Traceback" not in err
    if status == 0:
        assert (run_dir / "metrics.jsonl").exists()
    else:
        assert status == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("fastlm"), err


@pytest.mark.parametrize("flag, value", [("--emsize", 10 ** 7), ("--nhid", 10 ** 6), ("--nlayers", 10 ** 12)])
def test_a_run_too_big_for_memory_is_refused_before_allocating(tiny_data, tmp_path, flag, value):
    """Weights or one step's activations beyond the available memory: a one-line error, not an allocator
    crash (or, with overcommit, a machine swapping for an hour). emsize 10^7 on a 5-word corpus is 200 MB of
    weights but 28 GB of embedding output at batch 20, bptt 35."""
    status, _, err = run_cli(["train", "--data", str(tiny_data), "--device", "cpu", "--dry-run",
                              "--run-dir", str(tmp_path / "r"), "--emsize", "4", "--nhid", "4", flag, str(value)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "GiB" in lines[0] and "available" in lines[0], err
    assert not (tmp_path / "r").exists()
