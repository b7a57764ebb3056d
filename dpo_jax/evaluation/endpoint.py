"""An LLM judge behind an OpenAI-compatible chat-completions endpoint (vLLM locally, or a cloud API).

Each comparison shows the two responses as A and B in an order drawn per comparison from a fixed seed (exactly half
the comparisons of a call swapped), asks the endpoint with a template (judge_templates.py), reads the verdict from
the reply's last line (verdicts.py) and undoes the swap. A seeded share of the comparisons (`both_orders`) is asked
in the other order too, which measures position bias: the rate of "A" answers, how often the winner flips with the
order, and the win rate over order-consistent comparisons.

What can go wrong, and what happens:
- 408/425/429/5xx, timeouts, refused or reset connections and bodies cut short are retried with exponential backoff
  and jitter; a server's Retry-After (seconds or an HTTP date) is honoured; no wait exceeds `max_wait_s`. When
  retries run out the error names the URL (credentials removed) and how many verdicts are kept.
- A 200 reply without a usable message (not JSON, an `error` object, `content: null` or empty, `finish_reason`
  `length` — cut at max_tokens — or `content_filter`) is retried too, then counted as a *failed* comparison: never
  cached, so a later run asks it again.
- A usable reply whose last line names neither side is an *invalid* verdict: cached (asking again at the same
  temperature gives the same reply) and counted, never scored.
Every usable reply goes to a JSONL cache with its raw body and the model that served it, keyed by everything that
shapes it — base URL, model, messages, temperature, max tokens, the template's version — so an interrupted
evaluation resumes without asking again and two servers never share verdicts.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import datetime
import email.utils
import hashlib
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

import numpy as np

from dpo_jax.evaluation.judge_templates import load_template, template_version
from dpo_jax.evaluation.verdicts import both_orders, candidate_outcome, order_statistics, parse_verdict, swaps
from dpo_jax.evaluation.winrate import Judged, check_lengths
from dpo_jax.train.trainer import RunError

RETRYABLE = (408, 425, 429, 500, 502, 503, 504)
CACHE_VERSION = 2  # records of other versions (v1 stored failures as answers) are asked again
RAW_CHARS = 8000  # of each reply body kept in the cache


class JudgeError(RunError):
    """The endpoint cannot answer; the message names the URL and how many verdicts are kept (a `dpo-jax` command
    prints it and exits 1)."""


class UnusableReply(ValueError):
    """A 200 reply that carries no verdict to read (retried, then a failed comparison)."""


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
    base_url: str  # e.g. http://127.0.0.1:8000/v1 (vLLM) or https://api.openai.com/v1
    model: str  # the served model's name
    cache_path: str  # JSONL verdict cache
    template: str = "summarization"  # judge_templates.TEMPLATES name, or a template file
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable with the key; unset: no Authorization header
    max_concurrency: int = 8
    max_retries: int = 5
    backoff_s: float = 1.0  # first retry's wait; doubles per retry, times a jitter in [0.5, 1]
    max_wait_s: float = 60.0  # the cap on any one wait, a server's Retry-After included
    timeout_s: float = 120.0
    temperature: float = 0.0
    max_tokens: int = 256
    seed: int = 0  # the A/B order and the both-orders subset
    both_orders: float = 0.0  # share of comparisons also asked in the other order (position bias)


def redact(url: str) -> str:
    """The URL without credentials: no user:password@, every query value replaced by ***."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    query = urllib.parse.urlencode([(k, "***") for k, _ in urllib.parse.parse_qsl(parts.query, True)])
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def read_reply(payload: str) -> dict[str, Any]:
    """{content, finish_reason, served_model} of a chat-completions body; UnusableReply when it has no message."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError:
        raise UnusableReply(f"not JSON: {payload[:80]!r}") from None
    if not isinstance(data, dict):
        raise UnusableReply(f"not a JSON object: {payload[:80]!r}")
    if data.get("error"):
        raise UnusableReply(f"an error object: {json.dumps(data['error'])[:160]}")
    try:
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise UnusableReply("no choices[0].message.content") from None
    finish = choice.get("finish_reason")
    if not isinstance(content, str) or not content.strip():
        raise UnusableReply(f"an empty message (content {json.dumps(content)})")
    if finish == "length":
        raise UnusableReply("the reply was cut at max_tokens (finish_reason 'length'): raise the judge's max_tokens")
    if finish == "content_filter":
        raise UnusableReply("the reply was filtered (finish_reason 'content_filter')")
    return {"content": content, "finish_reason": finish, "served_model": str(data.get("model") or "")}


class EndpointJudge:
    def __init__(self, config: EndpointConfig, name: str | None = None):
        self.config = config
        self.endpoint = redact(config.base_url.rstrip("/"))
        self.name = name or f"{config.model} @ {self.endpoint}"
        self.template = load_template(config.template)
        self.template_version = template_version(config.template, self.template)
        parts = urllib.parse.urlsplit(config.base_url.rstrip("/"))
        # user:password@ in the URL becomes a Basic Authorization header (urllib does not send it itself)
        self._basic = base64.b64encode(f"{urllib.parse.unquote(parts.username or '')}:"
                                       f"{urllib.parse.unquote(parts.password or '')}".encode()).decode() \
            if parts.username or parts.password else ""
        netloc = parts.netloc.rpartition("@")[2]
        self.url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path + "/chat/completions", parts.query, ""))
        self.shown_url = self.endpoint + "/chat/completions"
        both_orders(1, config.both_orders, 0)  # a bad fraction fails here, before anything is asked
        self._lock = threading.Lock()
        self._jitter = random.Random(config.seed)
        self.cache = self._read_cache()
        self.stats = {"asked": 0, "cached": 0, "retries": 0, "invalid": 0, "failed": 0}

    # ----- the cache ------------------------------------------------------------------------------------------------

    def _read_cache(self) -> dict[str, dict]:
        cache = {}
        if os.path.isfile(self.config.cache_path):
            with open(self.config.cache_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        if record.get("v") == CACHE_VERSION and isinstance(record.get("reply"), str):
                            cache[record["key"]] = record
                    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                        continue  # a line torn by a kill mid-write: that one comparison is asked again
        return cache

    def _remember(self, key: str, reply: dict[str, Any], raw: str) -> None:
        record = {"v": CACHE_VERSION, "key": key, "endpoint": self.endpoint, "model": self.config.model,
                  "served_model": reply["served_model"], "finish_reason": reply["finish_reason"],
                  "verdict": parse_verdict(reply["content"]), "reply": reply["content"], "raw": raw[:RAW_CHARS]}
        with self._lock:
            self.cache[key] = record
            os.makedirs(os.path.dirname(os.path.abspath(self.config.cache_path)), exist_ok=True)
            with open(self.config.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def request_body(self, prompt: str, a: str, b: str) -> dict[str, Any]:
        content = self.template.format(prompt=prompt, a=a, b=b)
        return {"model": self.config.model, "messages": [{"role": "user", "content": content}],
                "temperature": self.config.temperature, "max_tokens": self.config.max_tokens}

    def cache_key(self, body: dict[str, Any]) -> str:
        """Everything that shapes the reply: the endpoint, the body (model, messages, temperature, max tokens) and
        the template's version."""
        # the whole URL but its user:password (hashed: a query may carry a key; its api-version still counts)
        endpoint = hashlib.sha256(self.url.encode()).hexdigest()
        shaped = {"v": CACHE_VERSION, "endpoint": endpoint, "template": self.template_version, "body": body}
        return hashlib.sha256(json.dumps(shaped, sort_keys=True).encode()).hexdigest()

    # ----- one request ---------------------------------------------------------------------------------------------

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        c = self.config
        with self._lock:
            jitter = self._jitter.uniform(0.5, 1.0)
        if retry_after is not None:  # the server's word, up to 10 % later so that clients told alike spread out
            return min(c.max_wait_s, retry_after * (1 + (jitter - 0.5) / 5))
        return min(c.max_wait_s, c.backoff_s * 2 ** attempt * jitter)

    def _ask(self, body: dict[str, Any]) -> tuple[dict[str, Any] | None, str, str]:
        """(reply, raw body, "") or (None, "", why) for a reply with no usable message after every retry; JudgeError
        when the endpoint cannot be reached or refuses (retries run out, or a status not worth retrying)."""
        c = self.config
        headers = {"Content-Type": "application/json"}
        if os.environ.get(c.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[c.api_key_env]}"
        elif self._basic:
            headers["Authorization"] = f"Basic {self._basic}"
        data = json.dumps(body).encode()
        last, unusable = "", False
        for attempt in range(c.max_retries + 1):
            retry_after = None
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=c.timeout_s) as response:
                    payload = response.read().decode("utf-8", "replace")
                try:
                    return read_reply(payload), payload, ""
                except UnusableReply as e:
                    last, unusable = f"an unusable reply: {e}", True
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:200]
                if e.code not in RETRYABLE:
                    raise JudgeError(f"judge endpoint {self.shown_url}: HTTP {e.code} {detail!r} (not retried)") \
                        from None
                last, unusable = f"HTTP {e.code} {detail!r}", False
                retry_after = retry_after_s(e.headers.get("Retry-After") if e.headers else None)
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as e:
                last, unusable = f"{type(e).__name__}: {getattr(e, 'reason', e)}", False
            if attempt < c.max_retries:
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(self._wait(attempt, retry_after))
        if unusable:
            return None, "", last
        raise JudgeError(f"judge endpoint {self.shown_url}: {last} after {c.max_retries + 1} attempts")

    # ----- a set of comparisons ----------------------------------------------------------------------------------

    def compare(self, prompts: Sequence[str], candidates: Sequence[str], baselines: Sequence[str]) -> np.ndarray:
        return self.judge(prompts, candidates, baselines).outcomes

    def judge(self, prompts: Sequence[str], candidates: Sequence[str], baselines: Sequence[str]) -> Judged:
        """Outcomes (the first order's), a record per comparison (shown order, reply, verdict, served model; the
        other order's where asked) and the set's failures and position-bias statistics."""
        check_lengths(prompts, candidates, baselines)
        n, c = len(prompts), self.config
        shown_as_b = swaps(n, c.seed)
        twice = both_orders(n, c.both_orders, c.seed)
        asks = []  # (comparison, candidate shown as B, cache key)
        bodies = {}
        for i in range(n):
            for as_b in (bool(shown_as_b[i]),) + ((not shown_as_b[i],) if twice[i] else ()):
                a, b = (baselines[i], candidates[i]) if as_b else (candidates[i], baselines[i])
                body = self.request_body(prompts[i], a, b)
                key = self.cache_key(body)
                bodies[key] = body
                asks.append((i, as_b, key))
        failures = self._fetch(bodies)
        outcomes, second = np.full(n, np.nan), np.full(n, np.nan)
        records: list[dict[str, Any]] = [{} for _ in range(n)]
        letters = []
        for i, as_b, key in asks:
            cached = self.cache.get(key)
            verdict = parse_verdict(cached["reply"]) if cached else None
            letters.append(verdict)
            first = not records[i]
            (outcomes if first else second)[i] = candidate_outcome(verdict, as_b)
            suffix = "" if first else "_other_order"
            records[i].update({f"shown{suffix}": "baseline first" if as_b else "candidate first",
                               f"verdict{suffix}": verdict, f"reply{suffix}": cached["reply"] if cached else None,
                               f"served_model{suffix}": cached["served_model"] if cached else None})
            if key in failures:
                records[i][f"failure{suffix}"] = failures[key]
        failed = sum("failure" in r for r in records)
        invalid = int(np.isnan(outcomes).sum()) - failed
        self.stats["failed"] += failed
        self.stats["invalid"] += invalid
        summary = {"failed": failed, "invalid": invalid, **order_statistics(letters, outcomes, second, twice)}
        return Judged(outcomes, records, summary)

    def _fetch(self, bodies: dict[str, dict[str, Any]]) -> dict[str, str]:
        """Asks every body not in the cache, `max_concurrency` at a time; returns {key: why} for the failed ones.
        A JudgeError (the endpoint unreachable) stops the rest and names how many verdicts are kept."""
        todo = [k for k in bodies if k not in self.cache]
        self.stats["cached"] += len(bodies) - len(todo)
        failures: dict[str, str] = {}
        stop = None
        with concurrent.futures.ThreadPoolExecutor(max(1, self.config.max_concurrency)) as pool:
            futures = {pool.submit(self._ask, bodies[k]): k for k in todo}
            for future in concurrent.futures.as_completed(futures):
                key = futures[future]
                try:
                    reply, raw, why = future.result()
                except JudgeError as e:
                    if stop is None:
                        stop = e
                        for f in futures:
                            f.cancel()  # queued requests are dropped; running ones finish and are cached
                    continue
                except concurrent.futures.CancelledError:
                    continue
                self.stats["asked"] += 1
                if reply is None:
                    failures[key] = why
                else:
                    self._remember(key, reply, raw)
        if stop is not None:
            kept = sum(k in self.cache for k in bodies)
            raise JudgeError(f"{stop}; {kept} of {len(bodies)} verdicts of this comparison are kept in "
                             f"{self.config.cache_path} and will not be asked again") from None
        if failures:
            print(f"[judge] {len(failures)} of {len(bodies)} replies from {self.shown_url} had no usable message "
                  f"after {self.config.max_retries + 1} attempts (counted as failed, not cached; a re-run asks "
                  f"them again), e.g. {next(iter(failures.values()))}", flush=True)
        return failures
