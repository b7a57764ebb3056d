"""Win-rate arithmetic and the judges: score judges, and the OpenAI-compatible endpoint judge against a stub server
on 127.0.0.1 (deterministic picks, a malformed reply, a slow reply, a 429, a dead endpoint, resume from the cache)."""

import http.server
import json
import threading
import time

import numpy as np
import pytest

from dpo_jax.evaluation import winrate
from dpo_jax.evaluation.endpoint import EndpointConfig, EndpointJudge, JudgeError, parse_verdict, swaps
from dpo_jax.evaluation.judges import ScoreJudge, pair_agreement


def test_win_rate_counts_ties_half_leaves_invalid_out_and_matches_published_wilson_intervals():
    r = winrate.win_rate([1] * 7 + [0.5] + [0] * 2 + [np.nan])
    assert (r["wins"], r["ties"], r["losses"], r["valid"], r["invalid"]) == (7, 1, 2, 10, 1)
    assert r["win_rate"] == pytest.approx(0.75)
    # Wilson's 95 % interval, textbook values: 5/10 -> (0.2366, 0.7634), 0/10 -> (0, 0.2775), 10/10 -> (0.7225, 1)
    assert winrate.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert winrate.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert winrate.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    low, high = r["low"], r["high"]
    assert low < 0.75 < high and (low, high) == pytest.approx(winrate.wilson_interval(7.5, 10))
    assert np.isnan(winrate.win_rate([np.nan, np.nan])["win_rate"])
    with pytest.raises(ValueError, match="outcomes must be"):
        winrate.win_rate([1, 0.3])
    np.testing.assert_array_equal(winrate.outcomes_from_scores([1, 2, 3, np.nan], [0, 2, 4, 1]), [1, 0.5, 0, np.nan])


def test_tables_and_plot(tmp_path):
    rows = [{"method": m, "temperature": t, **winrate.win_rate(o)}
            for m, o in (("dpo", [1, 1, 0.5, 0]), ("ppo", [0, 0, 1, np.nan])) for t in (0.0, 1.0)]
    winrate.write_tables(rows, str(tmp_path), baseline="the reference", judge="VADER")
    md = (tmp_path / "winrate.md").read_text()
    assert "| dpo | 62.5 % [" in md and "| ppo | 33.3 % [" in md and md.count("| 2 |") == 1  # ppo: 2 invalid
    assert len((tmp_path / "winrate.csv").read_text().splitlines()) == 5
    winrate.plot(rows, str(tmp_path / "winrate.png"), title="t")
    assert (tmp_path / "winrate.png").stat().st_size > 1000


def test_score_judge_and_pair_agreement():
    judge = ScoreJudge("length", lambda texts: [len(t) for t in texts])
    np.testing.assert_array_equal(judge.compare(["p", "p", "p"], ["aaa", "a", "bb"], ["a", "aaa", "cc"]), [1, 0, 0.5])
    with pytest.raises(ValueError, match="as many prompts"):
        judge.compare(["p"], ["a", "b"], ["c"])
    bad = ScoreJudge("short", lambda texts: [1.0])
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        bad.compare(["p"], ["a"], ["b"])
    human = np.array([0.0, 1.0, 2.0, 2.0])
    scores = np.array([0.0, 5.0, 4.0, 4.0])
    pairs = np.array([[0, 1], [1, 2], [2, 3], [0, 3]])  # agree, disagree, human tie (left out), agree
    assert pair_agreement(scores, human, pairs) == {"agreement": pytest.approx(2 / 3), "pairs": 3}
    assert pair_agreement(np.zeros(4), human, pairs)["agreement"] == 0.5  # judge ties count half


@pytest.mark.parametrize("reply, verdict", [
    ("Comparison: A is better.\nPreferred: A", "A"), ("blah\nMore helpful: \"B\"", "B"), ("B", "B"),
    ("Preferred: **A**.\n\n", "A"), ("Comparison: B names A.\nPreferred: neither", None), ("A or B", None),
    ("Preferred: A\nThanks!", None), ("", None)])
def test_verdict_is_read_from_the_last_line(reply, verdict):
    assert parse_verdict(reply) == verdict


class Stub:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 that prefers the response with more 'good's;
    prompts containing MALFORMED get a reply without a verdict, SLOW a late reply, RATE one 429 first, BROKEN
    always a 503."""

    def __init__(self):
        self.requests: list[str] = []
        self.shown_first: list[str] = []
        self.rate_limited: set[str] = set()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][0]["content"]
                prompt = text.split("Query: ", 1)[1].split("\n", 1)[0]
                stub.requests.append(prompt)
                if "BROKEN" in prompt or ("RATE" in prompt and prompt not in stub.rate_limited):
                    stub.rate_limited.add(prompt)
                    self.send_response(503 if "BROKEN" in prompt else 429)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(b"busy")
                    return
                if "SLOW" in prompt:
                    time.sleep(0.3)
                a = text.split("Response A:\n", 1)[1].split("\n\nResponse B:", 1)[0]
                b = text.split("Response B:\n", 1)[1].split("\n\nFIRST", 1)[0]
                stub.shown_first.append(a)
                pick = "A" if a.count("good") >= b.count("good") else "B"
                reply = f"Comparison: {pick} is nicer.\nMore helpful: {pick}"
                if "MALFORMED" in prompt:
                    reply = "I cannot tell."
                out = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


def _judge(url, cache, **kw):
    kw = {"template": "dialogue", "max_concurrency": 4, "backoff_s": 0.01, "max_retries": 2, "timeout_s": 10, **kw}
    return EndpointJudge(EndpointConfig(base_url=url, model="stub", cache_path=str(cache), **kw))


def test_order_is_balanced_and_undone(stub, tmp_path):
    for n in (1, 7, 40):
        assert int(swaps(n, 3).sum()) == n // 2
    assert not np.array_equal(swaps(40, 3), swaps(40, 4))
    n = 40
    judge = _judge(stub.url, tmp_path / "cache.jsonl", seed=3)
    out = judge.compare([f"q{i}" for i in range(n)], ["good good"] * n, ["bad"] * n)
    np.testing.assert_array_equal(out, np.ones(n))  # the candidate wins whichever side it was shown on
    assert stub.shown_first.count("good good") == n - n // 2
    out = judge.compare([f"r{i}" for i in range(n)], ["bad"] * n, ["good"] * n)
    np.testing.assert_array_equal(out, np.zeros(n))


def test_endpoint_judge_with_malformed_slow_and_rate_limited_replies_resumes_from_its_cache(stub, tmp_path):
    prompts = ["plain", "MALFORMED one", "SLOW one", "RATE one", "other"]
    cands = ["good", "good", "good good", "good", "bad"]
    bases = ["bad", "bad", "good", "bad", "good"]
    cache = tmp_path / "verdicts.jsonl"
    judge = _judge(stub.url, cache)
    out = judge.compare(prompts, cands, bases)
    np.testing.assert_array_equal(out, [1, np.nan, 1, 1, 0])
    assert judge.stats["invalid"] == 1 and judge.stats["retries"] == 1 and judge.stats["asked"] == 5
    assert stub.requests.count("RATE one") == 2 and len(stub.requests) == 6
    assert winrate.win_rate(out)["invalid"] == 1
    again = _judge(stub.url, cache)
    np.testing.assert_array_equal(again.compare(prompts, cands, bases), out)
    assert len(stub.requests) == 6 and again.stats["cached"] == 5  # nothing asked twice


def test_dead_endpoint_names_the_url_and_keeps_the_verdicts_so_far(stub, tmp_path):
    cache = tmp_path / "verdicts.jsonl"
    judge = _judge(stub.url, cache)
    with pytest.raises(JudgeError, match=r"127\.0\.0\.1.*HTTP 503.*after 3 attempts.*2 of 3 verdicts"):
        judge.compare(["a", "BROKEN", "b"], ["good"] * 3, ["bad"] * 3)
    assert len(cache.read_text().splitlines()) == 2
    closed = Stub()
    url = closed.url
    closed.close()  # nothing listens there any more
    with pytest.raises(JudgeError, match=url.replace(".", r"\.") + ".*after 3 attempts"):
        _judge(url, tmp_path / "other.jsonl").compare(["a"], ["x"], ["y"])
    before = len(stub.requests)
    resumed = _judge(stub.url, cache)
    assert np.isnan(resumed.compare(["a", "MALFORMED", "b"], ["good"] * 3, ["bad"] * 3)[1])
    assert len(stub.requests) == before + 1  # only the new comparison was asked


def test_template_file_is_checked(tmp_path):
    path = tmp_path / "judge.txt"
    path.write_text("Which is better for {prompt}? {a}")
    with pytest.raises(ValueError, match=r"judge\.txt.*lacks the placeholder\(s\) \{b\}"):
        _judge("http://127.0.0.1:9", tmp_path / "c.jsonl", template=str(path))
    path.write_text("{prompt} {a} {b} {json}")
    with pytest.raises(ValueError, match="unknown or malformed placeholder"):
        _judge("http://127.0.0.1:9", tmp_path / "c.jsonl", template=str(path))
    with pytest.raises(ValueError, match="not a built-in"):
        _judge("http://127.0.0.1:9", tmp_path / "c.jsonl", template="nope")
