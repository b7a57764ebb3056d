"""The sentiment experiment's corpus: archive checks, parsing, the split, and the real file via the package index."""

import hashlib
import io
import tarfile

import numpy as np
import pytest

from dpo_jax.experiments import sentiment_corpus as sc


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_extract_checks_the_archive_and_reads_the_nested_file(tmp_path):
    corpus = "1\t2.5\tA gorgeous film.\r\n2\t-1.25\tTepid, dull.\r\n"
    inner = _tar_gz({sc.CORPUS_MEMBER: corpus.encode()})
    sdist = tmp_path / sc.SDIST_FILE
    sdist.write_bytes(_tar_gz({sc.INNER_ARCHIVE: inner}))
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    sc.extract_corpus(str(sdist), str(tmp_path / "out.txt"), sha256=digest)
    snippets = sc.read_snippets(str(tmp_path / "out.txt"))
    assert snippets == [sc.Snippet("1", 2.5, "A gorgeous film."), sc.Snippet("2", -1.25, "Tepid, dull.")]
    with pytest.raises(sc.CorpusError, match="does not match the expected"):
        sc.extract_corpus(str(sdist), str(tmp_path / "x.txt"))  # the real checksum


def test_malformed_lines_and_the_split(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1\t0.5\tfine\n2\tnot-a-number\ttext\n")
    with pytest.raises(sc.CorpusError, match=r"bad\.txt:2: expected"):
        sc.read_snippets(str(bad))
    snippets = [sc.Snippet(str(i), 0.0, f"s{i}") for i in range(2000)]
    train, test = sc.split(snippets)
    assert not {s.id for s in train} & {s.id for s in test} and len(train) + len(test) == 2000
    assert 150 < len(test) < 250
    assert sc.split(list(reversed(snippets)))[1] == list(reversed(test))  # order-independent membership


def test_the_real_corpus_through_the_package_index_and_vader_tracks_human_ratings(tmp_path):
    path = sc.fetch_corpus(str(tmp_path))
    snippets = sc.read_snippets(path)
    # 10,605 sentences (ids 1..10605); `wc -l` says 10,604 because the last line has no newline
    assert len(snippets) == 10605 and snippets[0].id == "1" and snippets[-1].id == "10605"
    assert sc.fetch_corpus(str(tmp_path)) == path  # cached: no second download
    # the generalization domains (§6.3 analogue), extracted by the same fetch, with the counts the archive states
    for domain, count, first, last in (("amazon", 3708, "1_1", "309_8"), ("nyt", 5190, "1_1", "500_9"),
                                       ("tweets", 4200, "1", "4200")):
        other = sc.read_snippets(sc.fetch_corpus(str(tmp_path), domain))
        assert (len(other), other[0].id, other[-1].id) == (count, first, last), domain
        assert all(-4 <= s.rating <= 4 and s.text for s in other)
        assert len({s.id for s in other}) == count
    with pytest.raises(ValueError, match="unknown sentiment corpus domain 'imdb'"):
        sc.fetch_corpus(str(tmp_path), "imdb")
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    _, test = sc.split(snippets)
    analyzer = SentimentIntensityAnalyzer()
    vader = np.array([analyzer.polarity_scores(s.text)["compound"] for s in test])
    human = np.array([s.rating for s in test])
    assert np.corrcoef(vader, human)[0, 1] > 0.35  # the reward means something (VADER paper: r = 0.45)
