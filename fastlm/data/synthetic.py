"""A small corpus that fastlm generates itself, for running without Wikitext-2 (offline, tests, smoke runs).

A seeded toy grammar writes English-like text over ~450 made-up words with structure a model can learn:
nouns fall into semantic classes, each verb takes its subject from one class and its object from another,
adjectives fit one class, verbs and determiners agree in number with their subject, and word frequencies are
skewed (Zipf) as in real text. So a working model's perplexity falls well below the vocabulary size, while
a broken one stays near it. Same seed, same text, on every machine and Python version: only
random.Random's documented-stable calls (random, choice, choices, shuffle with an int seed) are used.
"""

from __future__ import annotations

import itertools
import random

from fastlm.data.corpus import Corpus, corpus_from_texts

SEED = 1111
# Target sizes in tokens (each split ends at the first paragraph that reaches its target).
SIZES = {"train": 80_000, "valid": 8_000, "test": 8_000}

_CLASSES, _NOUNS_PER_CLASS, _VERBS_PER_CLASS, _ADJECTIVES_PER_CLASS, _ADVERBS = 8, 16, 6, 5, 12
_DETERMINERS = {"sg": ["the", "a", "every", "this"], "pl": ["the", "some", "many", "these"]}
_PREPOSITIONS = ["in", "on", "near", "with", "under", "beyond"]
_CONJUNCTIONS = ["and", "but", "while", "because"]


class _Lexicon:
    """Made-up stems (consonant-vowel syllables, always ending in a vowel, so stem + 's' is never a stem)."""

    def __init__(self, rng: random.Random):
        syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
        stems = ["".join(pair) for pair in itertools.product(syllables, repeat=2)]
        rng.shuffle(stems)
        reserved = set(itertools.chain(*_DETERMINERS.values(), _PREPOSITIONS, _CONJUNCTIONS))
        fresh = (stem for stem in stems if stem not in reserved)

        def take(n: int) -> list[str]:
            return [next(fresh) for _ in range(n)]

        self.nouns = [take(_NOUNS_PER_CLASS) for _ in range(_CLASSES)]
        self.adjectives = [take(_ADJECTIVES_PER_CLASS) for _ in range(_CLASSES)]
        self.adverbs = [stem + "ly" for stem in take(_ADVERBS)]
        # verbs[c] = [(stem, object class)]: what a subject of class c does, and to which class.
        self.verbs = [[(stem, rng.randrange(_CLASSES)) for stem in take(_VERBS_PER_CLASS)] for _ in range(_CLASSES)]
        # Zipf weights: the first noun of a class is the commonest.
        self.noun_weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(_NOUNS_PER_CLASS)))
        self.class_weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(_CLASSES)))


def _noun_phrase(rng: random.Random, lex: _Lexicon, cls: int, number: str, depth: int = 0) -> list[str]:
    words = [rng.choice(_DETERMINERS[number])]
    if rng.random() < 0.4:
        words.append(rng.choice(lex.adjectives[cls]))
    noun = rng.choices(lex.nouns[cls], cum_weights=lex.noun_weights)[0]
    words.append(noun + "s" if number == "pl" else noun)
    if depth == 0 and rng.random() < 0.15:
        other = rng.choices(range(_CLASSES), cum_weights=lex.class_weights)[0]
        words += [rng.choice(_PREPOSITIONS), *_noun_phrase(rng, lex, other, rng.choice(("sg", "pl")), 1)]
    return words


def _clause(rng: random.Random, lex: _Lexicon) -> list[str]:
    cls = rng.choices(range(_CLASSES), cum_weights=lex.class_weights)[0]
    number = "pl" if rng.random() < 0.3 else "sg"
    verb, object_class = rng.choice(lex.verbs[cls])
    words = _noun_phrase(rng, lex, cls, number)
    words.append(verb + "s" if number == "sg" else verb)  # "the dog runs", "the dogs run"
    if rng.random() < 0.2:
        words.append(rng.choice(lex.adverbs))
    return words + _noun_phrase(rng, lex, object_class, "pl" if rng.random() < 0.3 else "sg")


def _paragraph(rng: random.Random, lex: _Lexicon) -> list[str]:
    words = []
    for _ in range(rng.choice((1, 2, 3, 4, 5))):
        words += _clause(rng, lex)
        if rng.random() < 0.25:
            words += [",", rng.choice(_CONJUNCTIONS), *_clause(rng, lex)]
        words.append(".")
    return words


def generated_texts(seed: int = SEED, sizes: dict[str, int] = SIZES) -> dict[str, str]:
    """split -> text (one paragraph per line, blank lines between some, as in Wikitext) for ``seed``;
    ``sizes`` gives each split's target in tokens (smaller corpora make quick tests)."""
    lex = _Lexicon(random.Random(seed))
    texts = {}
    for index, (split, target) in enumerate(sizes.items()):
        rng = random.Random(seed * len(sizes) + index + 1)  # its own stream per split, independent of the lexicon's
        lines, tokens = [], 0
        while tokens < target:
            line = " ".join(_paragraph(rng, lex)) if rng.random() < 0.9 else ""
            lines.append(line)
            tokens += line.count(" ") + 2 if line else 1  # words + <eos>
        texts[split] = "\n".join(lines) + "\n"
    return texts


def generated_corpus(seed: int = SEED, sizes: dict[str, int] = SIZES) -> Corpus:
    """The generated corpus for ``seed`` (and ``sizes``), tokenised like any other."""
    return corpus_from_texts(generated_texts(seed, sizes), source=f"generated toy corpus (seed {seed}), not Wikitext-2")
