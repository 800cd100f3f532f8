"""Training on a streamed corpus (--data-mode stream) is training on the same corpus in memory, step for step."""

import json

import pytest
import torch

from fastlm.data import Corpus, StreamedCorpus, generated_corpus, resolve_corpus
from fastlm.data.data_modes import stream_in_memory
from fastlm.train.run_folder import RunFolder
from fastlm.train.trainer import Trainer
from tests.helpers import one_line_error, quiet_display, run_cli, small_config, toy_corpus, write_corpus_folder


def losses_of(corpus, config, folder):
    steps = []
    trainer = Trainer(config, corpus, torch.device("cpu"), quiet_display(),
                      on_step=lambda step, loss: steps.append(float(loss)))
    result = trainer.fit(RunFolder(folder))
    return steps, result.best_val_loss, result.test_loss


def test_streamed_training_is_the_in_memory_training(tmp_path):
    memory = toy_corpus()
    streamed = stream_in_memory(memory, tmp_path / "cache")
    assert isinstance(streamed, StreamedCorpus)
    # Three epochs of 7 batches go round the train split (15 batches): resumed positions and wrapping included.
    config = small_config(train={"epochs": 3, "steps_per_epoch": 7})
    want = losses_of(memory, config, tmp_path / "memory")
    got = losses_of(streamed, config, tmp_path / "stream")
    assert got == want  # bit for bit: the batches are the same tensors


def test_train_flag_picks_the_mode_and_records_it(tmp_path):
    folder = write_corpus_folder(toy_corpus(), tmp_path)
    for mode in ("stream", "memory"):
        run = tmp_path / f"run-{mode}"
        status, _, err = run_cli("train", "--data", folder, "--data-mode", mode, "--dry-run", "--device", "cpu",
                                 "--emsize", 16, "--nhid", 16, "--batch-size", 4, "--bptt", 8, "--run-dir", run)
        assert status == 0, err
        config = json.loads((run / "config.json").read_text())
        assert config["data"]["data_mode"] == mode and config["data_mode_used"] == mode
    status, _, err = run_cli("train", "--data", "generated", "--data-mode", "disk", "--dry-run")
    assert "--data-mode" in one_line_error(status, err)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_generated_corpus_in_either_mode(tmp_path, mode):
    corpus = resolve_corpus("generated", cache_dir=tmp_path, mode=mode)
    assert isinstance(corpus, Corpus if mode == "memory" else StreamedCorpus) and corpus.mode == mode
    assert corpus.vocab == generated_corpus().vocab
