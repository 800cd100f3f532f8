"""The PyTorch example's Corpus, step for step: the oracle fastlm's tokenisation is held to (test_corpus.py,
test_streamed_corpus.py), with the texts that try it where line and word splitting differ."""

from pathlib import Path

import torch

from fastlm.data import SPLITS


class ExampleDictionary:
    """The example's Dictionary: a word gets the next id the first time it is added."""

    def __init__(self):
        self.word2idx = {}
        self.idx2word = []

    def add_word(self, word):
        if word not in self.word2idx:
            self.idx2word.append(word)
            self.word2idx[word] = len(self.idx2word) - 1
        return self.word2idx[word]


def example_corpus(folder: Path):
    """The PyTorch word_language_model example's Corpus, step for step: one pass adds every word, a second
    pass makes a tensor per line, and the lines are concatenated. Returns (idx2word, split -> ids)."""
    dictionary = ExampleDictionary()
    splits = {}
    for split in SPLITS:
        path = folder / f"{split}.txt"
        with open(path, "r", encoding="utf8") as f:
            for line in f:
                words = line.split() + ["<eos>"]
                for word in words:
                    dictionary.add_word(word)
        with open(path, "r", encoding="utf8") as f:
            idss = []
            for line in f:
                words = line.split() + ["<eos>"]
                ids = []
                for word in words:
                    ids.append(dictionary.word2idx[word])
                idss.append(torch.tensor(ids).type(torch.int64))
            splits[split] = torch.cat(idss)
    return dictionary.idx2word, splits


def write_corpus(folder: Path, train: bytes, valid: bytes = b"v w\n", test: bytes = b"t\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, data in zip(SPLITS, (train, valid, test), strict=True):
        (folder / f"{split}.txt").write_bytes(data)
    return folder


def assert_same_as_example(corpus, folder: Path):
    idx2word, splits = example_corpus(folder)
    assert corpus.vocab.idx2word == idx2word
    for split in SPLITS:
        assert torch.equal(getattr(corpus, split), splits[split]), split


TRICKY = {
    "blank lines": "a b\n\n\nc\n",
    "no trailing newline": "a b\nc d",
    "whitespace-only last line": "a\n   ",
    "crlf": "a b\r\nc\r\n\r\nd",
    "lone cr": "a\rb c\r\rd\r",
    "cr at end without lf": "a b\r",
    "unicode line separators inside lines": "a\u2028b\u2029c\x85d\n e\x0cf\x0bg\x1ch\x1di\x1ej\x1fk\n",
    "unicode spaces": "a\xa0b\u3000c\u2003d\u202fe\u205ff\u1680g\n",
    "tabs and runs of spaces": "\ta\t\tb   c \t\n  d  \n",
    "literal eos word": "<eos> a<eos> b <eos>\n<eos>",
    "byte order mark": "\ufeffa b\nc\n",
    "wikitext-like": " \n = Title = \n \n Some text , with @-@ marks . \n",
}


# Characters that split lines or words somewhere (file iteration, str.split, str.splitlines) plus plain ones.
ALPHABET = "ab<>eos \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u2028\u2029\u3000\ufeff\u00e9"
