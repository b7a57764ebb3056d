"""The sentiment experiment's corpora: sentences with mean human sentiment ratings from four domains.

They ship inside the vaderSentiment 3.3.2 source distribution (MIT) on the package index
(`additional_resources/hutto_ICWSM_2014.tar.gz`, tab-separated lines: id, mean rating in [-4, 4], text): 10,605
movie-review sentences (the experiment's training domain) and, for generalization (the paper's §6.3), 3,708
Amazon product-review sentences, 5,190 New York Times editorial sentences and 4,200 tweets. `fetch_corpus` gets
the archive with `pip download` into the cache directory once, checks its SHA-256 and extracts the four files;
later runs read the cached copies and need no network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

SDIST = "vaderSentiment==3.3.2"
SDIST_FILE = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
CORPUS_FILE = "movieReviewSnippets_GroundTruth.txt"
CORPUS_MEMBER = "hutto_ICWSM_2014/" + CORPUS_FILE
DOMAINS = {"movies": CORPUS_FILE, "amazon": "amazonReviewSnippets_GroundTruth.txt",
           "nyt": "nytEditorialSnippets_GroundTruth.txt", "tweets": "tweets_GroundTruth.txt"}


class CorpusError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Snippet:
    id: str  # "17" (movies, tweets) or "309_8" (review/editorial 309, sentence 8)
    rating: float  # mean human rating, -4 (very negative) .. 4 (very positive)
    text: str


def _download_sdist(directory: str) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", directory]
    out = subprocess.run(cmd, capture_output=True, text=True)
    path = os.path.join(directory, SDIST_FILE)
    if out.returncode != 0 or not os.path.isfile(path):
        raise CorpusError(f"could not fetch {SDIST} from the package index ({out.stderr.strip()[-300:]})")
    return path


def extract_corpus(sdist_path: str, out_path: str, sha256: str = SDIST_SHA256, member: str = CORPUS_FILE) -> None:
    """Checks the source archive and writes its ground-truth file `member` to `out_path` (atomically)."""
    with open(sdist_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != sha256:
        raise CorpusError(f"{sdist_path}: SHA-256 {digest} does not match the expected {sha256}")
    with tarfile.open(sdist_path, "r:gz") as outer:
        inner_bytes = outer.extractfile(INNER_ARCHIVE).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        data = inner.extractfile("hutto_ICWSM_2014/" + member).read()
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out_path)


def fetch_corpus(cache_dir: str, domain: str = "movies") -> str:
    """Path of a domain's cached ground-truth file, fetching the archive (all four domains) through the package
    index the first time one is missing."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown sentiment corpus domain {domain!r}; one of {', '.join(DOMAINS)}")
    out_path = os.path.join(cache_dir, "sentiment", DOMAINS[domain])
    if os.path.isfile(out_path):
        return out_path
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sdist = _download_sdist(tmp)
        except CorpusError as e:
            raise CorpusError(f"{e}; no cached copy at {out_path} either. Run once with access to the package index, "
                              f"or place {DOMAINS[domain]} from {SDIST}'s {INNER_ARCHIVE} there") from None
        for name in DOMAINS.values():
            extract_corpus(sdist, os.path.join(cache_dir, "sentiment", name), member=name)
    return out_path


def read_snippets(path: str) -> list[Snippet]:
    """Parses `id<TAB>rating<TAB>text` lines; a malformed line is an error naming it."""
    snippets = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            try:
                snippets.append(Snippet(parts[0].strip(), float(parts[1]), parts[2].strip()))
                if not snippets[-1].id or not snippets[-1].text:
                    raise IndexError
            except (IndexError, ValueError):
                raise CorpusError(f"{path}:{n}: expected 'id<TAB>rating<TAB>text', got {line[:80]!r}") from None
    return snippets


def split(snippets: list[Snippet], test_fraction: float = 0.1) -> tuple[list[Snippet], list[Snippet]]:
    """Deterministic train/test split by a hash of the id (independent of file order and of any seed)."""
    def is_test(s: Snippet) -> bool:
        return int(hashlib.sha256(s.id.encode()).hexdigest()[:8], 16) / 16**8 < test_fraction

    return [s for s in snippets if not is_test(s)], [s for s in snippets if is_test(s)]


def draw_prefixes(ids: list[list[int]], n: int, seed: int, min_prefix: int, max_prefix: int, pad: int,
                  skip: int = 0) -> tuple[np.ndarray, np.ndarray, list[int], np.ndarray]:
    """(prompts, mask [n, max_prefix] left-padded, sentence indices, prefix lengths): min-max-token prefixes of
    n random sentences longer than max_prefix, after the first `skip` of the same draw (so sets drawn with other
    skips share no sentence)."""
    rng = np.random.default_rng(seed)
    eligible = [i for i in rng.permutation(len(ids)) if len(ids[i]) > max_prefix]
    if skip + n > len(eligible):
        raise ValueError(f"{skip} + {n} prefixes asked of {len(eligible)} sentences longer than pairs.max_prefix: "
                         "lower config.eval.prefixes, config.sweep.prefixes or config.winrate.prefixes")
    rows = eligible[skip:skip + n]
    lengths = rng.integers(min_prefix, max_prefix + 1, skip + len(rows))[skip:]
    out = np.full((len(rows), max_prefix), pad, np.int32)
    mask = np.zeros_like(out)
    for r, (i, k) in enumerate(zip(rows, lengths)):
        out[r, max_prefix - k:], mask[r, max_prefix - k:] = ids[i][:k], 1
    return out, mask, rows, lengths


def sentence_batches(ids: list[list[int]], batch: int, length: int, eos: int, pad: int, seed: int):
    """π_SFT's batches for the `lm` mode: `batch` sentences drawn with replacement, each + EOS a scored row, two
    sentences to a "pair" (batch // 2 pairs; every row is trained on)."""
    if batch % 2:
        raise ValueError(f"config.sft.batch ({batch}) must be even: π_SFT trains two sentences per pair of rows")
    rng = np.random.default_rng(seed)
    while True:
        index = rng.integers(0, len(ids), batch)
        rows = np.full((batch, length), pad, np.int32)
        mask = np.zeros_like(rows)
        for r, i in enumerate(index):
            seq = ids[i] + [eos]
            rows[r, :len(seq)] = seq
            mask[r, 1:len(seq)] = 1
        yield {"input_ids": rows, "loss_mask": mask, "attention_mask": (rows != pad).astype(np.int32) |
               (np.arange(length) == 0), "example_id": index[:batch // 2].astype(np.int32),
               "example_mask": np.ones(batch // 2, np.int32)}
