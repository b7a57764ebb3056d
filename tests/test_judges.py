"""Win-rate arithmetic and the judges: score judges, and the OpenAI-compatible endpoint judge against a stub server
on 127.0.0.1 — every way a reply can fail (retried, then reported or counted, never cached as a verdict), the cache
(resume, two servers, a recovered server), Retry-After in both forms, credentials never shown, the verdict parser,
and position bias (an always-"A" judge)."""

import email.utils
import http.server
import json
import re
import threading
import time

import numpy as np
import pytest

from dpo_jax.evaluation import winrate
from dpo_jax.evaluation.endpoint import EndpointConfig, EndpointJudge, JudgeError, redact, retry_after_s
from dpo_jax.evaluation.verdicts import parse_verdict, swaps
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
    agree = pair_agreement(scores, human, pairs)
    assert (agree["agreement"], agree["pairs"]) == (pytest.approx(2 / 3), 3) and agree["low"] < 2 / 3 < agree["high"]
    assert pair_agreement(np.zeros(4), human, pairs)["agreement"] == 0.5  # judge ties count half


@pytest.mark.parametrize("reply, verdict", [
    ("Comparison: A is better.\nPreferred: A", "A"), ("blah\nMore helpful: \"B\"", "B"), ("B", "B"),
    ("Preferred: **A**.\n\n", "A"), ("Comparison: x\nPreferred: Summary A", "A"), ("More helpful: Response B", "B"),
    ("Preferred: A (more concise)", "A"), ("Preferred: \u201cB\u201d", "B"), ("A!", "A"), ("`B`", "B"),
    ("### Answer: A", "A"), ("**Preferred:** **B**", "B"), ("The better summary: B", "B"), ("Preferred: [A].", "A"),
    ("Final answer: 'B'", "B"),
    # no verdict: neither side, both, a looser sentence, not the last line, not the letter
    ("Comparison: B names A.\nPreferred: neither", None), ("A or B", None), ("Preferred: A\nThanks!", None),
    ("", None), ("it is clear because of point: a", None), ("the reason is point: A", None), ("I prefer A", None),
    ("Summary B is better", None), ("Preferred: a", None), ("Preferred: A and B", None), ("Preferred: C", None)])
def test_verdict_is_read_from_the_last_line_and_nothing_looser(reply, verdict):
    assert parse_verdict(reply) == verdict


def _chat(content, finish="stop", model="served-model-7"):
    return json.dumps({"model": model, "choices": [{"message": {"role": "assistant", "content": content},
                                                     "finish_reason": finish}]}).encode()


class Stub:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 that prefers the response with more 'good's (or
    always answers A: `always_a`). By a word in the prompt: MALFORMED a reply without a verdict; SLOW a late reply;
    RATE one 429 (Retry-After 0) first; DATED one 503 with an HTTP-date Retry-After 2 s ahead; BROKEN always 503;
    TRUNC one body cut short and RESET one dropped connection first; while not `healthy`: EMPTY content null, HTML
    a proxy's page, ERROR an error object, CUT a reply cut at max_tokens."""

    def __init__(self, always_a=False, fail_after=None):
        self.requests: list[str] = []
        self.fail_after, self.answered = fail_after, set()  # 503 for every request after the first `fail_after`
        self.times: dict[str, list[float]] = {}
        self.shown_first: list[str] = []
        self.once: set[str] = set()
        self.healthy, self.always_a = False, always_a
        self.authorization: list[str] = []
        self.bodies: list[str] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status, out, headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.authorization.append(self.headers.get("Authorization", ""))
                text = body["messages"][0]["content"]
                prompt = re.search(r"(?:Query: |Post:\n)(.*)\n", text).group(1)
                stub.bodies.append(text)
                stub.requests.append(prompt)
                stub.times.setdefault(prompt, []).append(time.time())
                first = prompt not in stub.once
                stub.once.add(prompt)
                if stub.fail_after is not None and len(stub.requests) > stub.fail_after:
                    return self.send(503, b"down", [("Retry-After", "0")])
                if "BROKEN" in prompt or ("RATE" in prompt and first):
                    return self.send(503 if "BROKEN" in prompt else 429, b"busy", [("Retry-After", "0")])
                if "DATED" in prompt and first:
                    return self.send(503, b"busy", [("Retry-After", email.utils.formatdate(time.time() + 2,
                                                                                          usegmt=True))])
                if "TRUNC" in prompt and first:
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"choices": [')
                    return
                if "RESET" in prompt and first:
                    self.close_connection = True
                    return
                if not stub.healthy:
                    if "EMPTY" in prompt:
                        return self.send(200, _chat(None))
                    if "HTML" in prompt:
                        return self.send(200, b"<html><body>502 Bad Gateway</body></html>")
                    if "ERROR" in prompt:
                        return self.send(200, json.dumps({"error": {"message": "overloaded"}}).encode())
                    if "CUT" in prompt:
                        return self.send(200, _chat("Comparison: A is long and", finish="length"))
                if "SLOW" in prompt:
                    time.sleep(0.3)
                a, b = re.search(r"(?:Response|Summary) A:\n(.*)\n\n(?:Response|Summary) B:\n(.*)\n\nFIRST", text,
                                 re.DOTALL).groups()
                stub.shown_first.append(a)
                pick = "A" if stub.always_a or a.count("good") >= b.count("good") else "B"
                reply = "I cannot tell." if "MALFORMED" in prompt else \
                    f"Comparison: {pick} is nicer.\nMore helpful: {pick}"
                stub.answered.add(text)
                self.send(200, _chat(reply), [("Content-Type", "application/json")])

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


def test_malformed_slow_rate_limited_truncated_and_reset_replies_then_resume_from_the_cache(stub, tmp_path):
    prompts = ["plain", "MALFORMED one", "SLOW one", "RATE one", "other", "TRUNC one", "RESET one"]
    cands = ["good", "good", "good good", "good", "bad", "good", "good"]
    bases = ["bad", "bad", "good", "bad", "good", "bad", "bad"]
    cache = tmp_path / "verdicts.jsonl"
    judge = _judge(stub.url, cache)
    judged = judge.judge(prompts, cands, bases)
    np.testing.assert_array_equal(judged.outcomes, [1, np.nan, 1, 1, 0, 1, 1])
    assert judged.summary["invalid"] == 1 and judged.summary["failed"] == 0
    assert judge.stats["retries"] == 3 and judge.stats["asked"] == 7  # the 429, the cut body, the reset
    assert stub.requests.count("RATE one") == stub.requests.count("TRUNC one") == 2 and len(stub.requests) == 10
    record = judged.records[1]  # the invalid verdict is kept with the raw reply and the model that served it
    assert (record["reply"], record["verdict"], record["served_model"]) == ("I cannot tell.", None, "served-model-7")
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert all(r["raw"].startswith('{"model": "served-model-7"') and r["endpoint"] == stub.url for r in lines)
    again = _judge(stub.url, cache)
    np.testing.assert_array_equal(again.compare(prompts, cands, bases), judged.outcomes)
    assert len(stub.requests) == 10 and again.stats["cached"] == 7  # nothing asked twice


def test_replies_without_a_message_are_failures_never_cached_and_asked_again_once_the_server_recovers(stub, tmp_path,
                                                                                                       capsys):
    prompts = ["EMPTY", "HTML", "ERROR", "CUT", "fine"]
    cache = tmp_path / "verdicts.jsonl"
    judged = _judge(stub.url, cache).judge(prompts, ["good"] * 5, ["bad"] * 5)
    np.testing.assert_array_equal(judged.outcomes, [np.nan] * 4 + [1])
    assert judged.summary["failed"] == 4 and judged.summary["invalid"] == 0
    assert all(stub.requests.count(p) == 3 for p in prompts[:4])  # each retried (max_retries = 2)
    why = [r["failure"] for r in judged.records[:4]]
    assert "empty message" in why[0] and "not JSON" in why[1] and "error object" in why[2] and "max_tokens" in why[3]
    assert "4 of 5 replies from " + stub.url in capsys.readouterr().out
    assert len(cache.read_text().splitlines()) == 1  # only the usable reply
    row = winrate.win_rate(judged.outcomes) | judged.summary
    assert (row["invalid"], row["failed"], row["valid"]) == (0, 4, 1)
    stub.healthy = True
    before = len(stub.requests)
    recovered = _judge(stub.url, cache).compare(prompts, ["good"] * 5, ["bad"] * 5)
    np.testing.assert_array_equal(recovered, np.ones(5))
    assert len(stub.requests) == before + 4  # every earlier failure asked again, the cached verdict not


def test_two_servers_with_one_model_name_do_not_share_verdicts(stub, tmp_path):
    other = Stub(always_a=True)
    try:
        cache = tmp_path / "verdicts.jsonl"
        first = _judge(stub.url, cache).compare(["q0", "q1"], ["bad", "bad"], ["good", "good"])
        second = _judge(other.url, cache).compare(["q0", "q1"], ["bad", "bad"], ["good", "good"])
        np.testing.assert_array_equal(first, [0, 0])
        assert len(other.requests) == 2 and sorted(second) == [0, 1]  # asked, and it answers A whatever is shown
    finally:
        other.close()


def test_retry_after_in_both_forms_is_honoured_with_a_cap(stub, tmp_path):
    now = 1_000_000.0
    assert retry_after_s("7", now) == 7.0 and retry_after_s("1.5", now) == 1.5
    assert retry_after_s(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30.0)
    assert retry_after_s(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0  # a date gone by: at once
    assert retry_after_s("soon", now) is None and retry_after_s(None, now) is None
    judge = _judge(stub.url, tmp_path / "c.jsonl", max_wait_s=5.0)
    waits = [judge._wait(0, 30.0) for _ in range(20)]
    assert all(w == 5.0 for w in waits)  # capped
    waits = [judge._wait(0, 1.0) for _ in range(50)]
    assert all(1.0 <= w <= 1.1 for w in waits) and len(set(waits)) > 1  # the server's wait, jittered upwards
    backoff = [judge._wait(3, None) for _ in range(50)]
    assert all(0.04 <= w <= 0.08 for w in backoff) and len(set(backoff)) > 1  # 0.01 * 2^3, jittered in [½, 1]
    judged = judge.judge(["DATED one"], ["good"], ["bad"])
    first, second = stub.times["DATED one"]
    assert judged.outcomes[0] == 1 and second - first >= 0.9  # waited for the date (1-2 s at 1 s resolution)


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


def test_credentials_in_the_url_are_sent_but_never_shown(stub, tmp_path, capsys):
    port = stub.url.split(":")[2].split("/")[0]
    url = f"http://user:s3cret@127.0.0.1:{port}/v1?api-key=k3y"
    assert redact(url) == f"http://127.0.0.1:{port}/v1?api-key=%2A%2A%2A"
    judge = _judge(url, tmp_path / "c.jsonl")
    assert judge.compare(["q"], ["good"], ["bad"])[0] == 1
    assert stub.authorization[-1] == "Basic dXNlcjpzM2NyZXQ="  # user:s3cret
    with pytest.raises(JudgeError) as error:
        judge.compare(["BROKEN"], ["good"], ["bad"])
    shown = str(error.value) + judge.name + (tmp_path / "c.jsonl").read_text() + capsys.readouterr().out
    assert "s3cret" not in shown and "k3y" not in shown and "127.0.0.1" in shown


def test_an_always_a_judge_shows_its_position_bias(tmp_path):
    stub = Stub(always_a=True)
    try:
        n = 40
        judge = _judge(stub.url, tmp_path / "c.jsonl", both_orders=0.5)
        judged = judge.judge([f"q{i}" for i in range(n)], ["good"] * n, ["bad"] * n)
        s = judged.summary
        assert winrate.win_rate(judged.outcomes)["win_rate"] == 0.5  # the raw win rate hides it
        assert (s["a_rate"], s["asked_twice"], s["order_flips"], s["consistent"]) == (1.0, 20, 1.0, 0)
        assert np.isnan(s["consistent_win_rate"]) and len(stub.requests) == 60
        twice = [r for r in judged.records if "verdict_other_order" in r]
        assert len(twice) == 20 and all(r["shown"] != r["shown_other_order"] for r in twice)
        rows = [{"method": "policy", "temperature": 0.0, **winrate.win_rate(judged.outcomes), **s}]
        md = winrate.markdown_table(rows, baseline="b", judge="j")
        assert "| policy | 100.0 % | 20 | 100.0 % | — |" in md
    finally:
        stub.close()
    fair = Stub()
    try:
        judged = _judge(fair.url, tmp_path / "d.jsonl", both_orders=1.0).judge(
            [f"q{i}" for i in range(10)], ["good"] * 10, ["bad"] * 10)
        s = judged.summary
        assert (s["a_rate"], s["order_flips"], s["consistent"], s["consistent_win_rate"]) == (0.5, 0.0, 10, 1.0)
    finally:
        fair.close()


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
    with pytest.raises(ValueError, match=r"both_orders fraction = 1\.5"):
        _judge("http://127.0.0.1:9", tmp_path / "c.jsonl", both_orders=1.5)


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.integers(10, 40, n).astype(float)
    cand = base + rng.normal(4, 6, n).round()  # mostly longer
    longer_wins = np.where(cand > base, 1.0, np.where(cand == base, 0.5, 0.0))  # a judge that only counts tokens
    raw = winrate.win_rate(longer_wins)["win_rate"]
    lc = winrate.length_controlled_win_rate(longer_wins, cand, base)
    assert raw > 0.65 and abs(lc - 0.5) < 0.1  # the win at equal lengths is a coin flip
    quality = (rng.random(n) < 0.7).astype(float)  # a preference that ignores length: LC stays at the raw rate
    assert winrate.length_controlled_win_rate(quality, cand, base) == pytest.approx(quality.mean(), abs=0.05)
    with_invalid = np.where(np.arange(n) % 10 == 0, np.nan, quality)
    assert np.isfinite(winrate.length_controlled_win_rate(with_invalid, cand, base))
    assert np.isnan(winrate.length_controlled_win_rate([np.nan], [1], [2]))
    fields = winrate.length_fields(quality, cand, cand < 30, base)
    assert fields["length"] == pytest.approx(cand.mean()) and fields["eos_rate"] == pytest.approx(np.mean(cand < 30))


def test_paired_differences_leave_out_prompts_without_a_verdict_and_say_ahead_only_outside_the_interval():
    records = []
    for method, wins in (("dpo", [1.0] * 30 + [None]), ("ppo", [0.0] * 30 + [1.0]), ("sft", [1.0] * 29 + [0.0, 1.0])):
        records += [{"method": method, "temperature": 0.0, "prompt_index": i, "outcome": w} for i, w in enumerate(wins)]
    md = winrate.paired_differences(records, "dpo")
    assert "| dpo − ppo | +100.0 [+100.0, +100.0] ahead |" in md  # prompt 30 left out: no verdict for dpo
    assert "| dpo − sft | +3.3 [" in md and md.rstrip().endswith("level |")
    assert winrate.paired_differences(records[:31], "dpo") == ""
