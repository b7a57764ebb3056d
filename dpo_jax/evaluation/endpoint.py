"""An LLM judge behind an OpenAI-compatible chat-completions endpoint (vLLM locally, or a cloud API).

Each comparison shows the two responses as A and B in an order drawn per comparison from a fixed seed (exactly
half the comparisons of a call swapped), asks the endpoint with the paper's prompt (judge_templates.py), reads the
verdict from the reply's last line and undoes the swap. A reply naming neither A nor B is invalid: counted and
reported, never scored as a loss. Requests run `max_concurrency` at a time; 429, 5xx, timeouts and refused
connections are retried with exponential backoff (a server's Retry-After is honoured); every reply is appended to
a JSONL cache keyed by the exact request, so an interrupted evaluation resumes without asking again. When retries
run out the error names the URL, and the verdicts so far stay in the cache.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np

from dpo_jax.evaluation.judge_templates import load_template

RETRYABLE = (429, 500, 502, 503, 504)


class JudgeError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
    base_url: str  # e.g. http://127.0.0.1:8000/v1 (vLLM) or https://api.openai.com/v1
    model: str  # the served model's name
    cache_path: str  # JSONL verdict cache
    template: str = "summarization"  # summarization | dialogue | a template file
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable with the key; unset: no Authorization header
    max_concurrency: int = 8
    max_retries: int = 5
    backoff_s: float = 1.0  # first retry's wait; doubles per retry, capped at 60 s
    timeout_s: float = 120.0
    temperature: float = 0.0
    max_tokens: int = 256
    seed: int = 0


def parse_verdict(reply: str) -> str | None:
    """'A' or 'B' from the reply's last non-empty line ('Preferred: A', 'More helpful: "B"', 'A'); else None."""
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    if not lines:
        return None
    answer = lines[-1].rsplit(":", 1)[-1]
    answer = re.sub(r"[\s\"'*`.()\[\]<>]", "", answer).upper()
    return answer if answer in ("A", "B") else None


def swaps(n: int, seed: int) -> np.ndarray:
    """[n] bool: which comparisons show the candidate as B. Exactly ⌊n/2⌋ are swapped, chosen by `seed`."""
    return np.random.default_rng(seed).permutation(n) < n // 2


class EndpointJudge:
    def __init__(self, config: EndpointConfig, name: str | None = None):
        self.config = config
        self.name = name or f"{config.model} @ {config.base_url}"
        self.template = load_template(config.template)
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self._lock = threading.Lock()
        self.cache = self._read_cache()
        self.stats = {"asked": 0, "cached": 0, "retries": 0, "invalid": 0}

    def _read_cache(self) -> dict[str, str]:
        cache = {}
        if os.path.isfile(self.config.cache_path):
            with open(self.config.cache_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        cache[record["key"]] = record["reply"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line torn by a kill mid-write: that one comparison is asked again
        return cache

    def _remember(self, key: str, reply: str) -> None:
        with self._lock:
            self.cache[key] = reply
            os.makedirs(os.path.dirname(os.path.abspath(self.config.cache_path)), exist_ok=True)
            with open(self.config.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")

    def request_body(self, prompt: str, a: str, b: str) -> dict[str, Any]:
        content = self.template.format(prompt=prompt, a=a, b=b)
        return {"model": self.config.model, "messages": [{"role": "user", "content": content}],
                "temperature": self.config.temperature, "max_tokens": self.config.max_tokens}

    def _ask(self, body: dict[str, Any]) -> str:
        """The reply's text, retrying what is retryable; JudgeError when retries run out or the request is refused."""
        c = self.config
        headers = {"Content-Type": "application/json"}
        if os.environ.get(c.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[c.api_key_env]}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(c.max_retries + 1):
            wait = min(60.0, c.backoff_s * 2 ** attempt)
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=c.timeout_s) as response:
                    payload = response.read().decode("utf-8", "replace")
                try:
                    return json.loads(payload)["choices"][0]["message"]["content"] or ""
                except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                    return ""  # a reply without a message: invalid, like one naming neither side
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:200]
                if e.code not in RETRYABLE:
                    raise JudgeError(f"judge endpoint {self.url}: HTTP {e.code} {detail!r} (not retried)") from None
                last = f"HTTP {e.code} {detail!r}"
                after = e.headers.get("Retry-After") if e.headers else None
                if after and after.replace(".", "", 1).isdigit():
                    wait = min(60.0, float(after))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < c.max_retries:
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(wait)
        raise JudgeError(f"judge endpoint {self.url}: {last} after {c.max_retries + 1} attempts")

    def compare(self, prompts: Sequence[str], candidates: Sequence[str], baselines: Sequence[str]) -> np.ndarray:
        from dpo_jax.evaluation.judges import _check_lengths

        _check_lengths(prompts, candidates, baselines)
        swapped = swaps(len(prompts), self.config.seed)
        keys, bodies = [], []
        for p, cand, base, s in zip(prompts, candidates, baselines, swapped):
            body = self.request_body(p, base, cand) if s else self.request_body(p, cand, base)
            bodies.append(body)
            keys.append(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest())
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        self.stats["cached"] += len(keys) - len(todo)
        failure = None
        with concurrent.futures.ThreadPoolExecutor(max(1, self.config.max_concurrency)) as pool:
            futures = {pool.submit(self._ask, bodies[i]): i for i in todo}
            for future in concurrent.futures.as_completed(futures):
                try:
                    self._remember(keys[futures[future]], future.result())
                    self.stats["asked"] += 1
                except JudgeError as e:
                    if failure is None:
                        failure = e
                        for f in futures:
                            f.cancel()  # queued requests are dropped; running ones finish and are cached
                except concurrent.futures.CancelledError:
                    pass
        if failure is not None:
            done = sum(k in self.cache for k in keys)
            raise JudgeError(f"{failure}; {done} of {len(keys)} verdicts of this comparison are kept in "
                             f"{self.config.cache_path} and will not be asked again") from None
        verdicts = [parse_verdict(self.cache[k]) for k in keys]
        outcomes = np.full(len(keys), np.nan)
        for i, (v, s) in enumerate(zip(verdicts, swapped)):
            if v is not None:
                outcomes[i] = 1.0 if (v == "A") != bool(s) else 0.0
        self.stats["invalid"] += int(np.isnan(outcomes).sum())
        return outcomes
