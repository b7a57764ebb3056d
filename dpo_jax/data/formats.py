"""Readers for the preference datasets the DPO paper and its successors use -> `PreferenceExample`s.

Every reader takes a local file or directory. A malformed row (bad JSON, a missing field, a wrong type) raises
`DataError` naming the file, line and field. A well-formed but degenerate pair (empty response, identical
responses, a rejected text that does not continue the prompt, ...) is yielded as `Skip(reason, where)`, and the
caller's `on_bad_example` policy decides between an error and a counted skip — never a silent drop.

Texts are strings, or, for conversational data, tuples of {"role", "content"} messages rendered later with the
tokenizer's chat template.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from typing import Any, Callable, Iterator, Union

Message = dict[str, str]
Text = Union[str, tuple[Message, ...]]

FORMATS = ("hh", "shp", "tldr", "ultrafeedback", "generic")
BAD_EXAMPLE_POLICIES = ("error", "skip")
HH_ASSISTANT = "\n\nAssistant:"


class DataError(ValueError):
    """A user data mistake; the message starts with `file:line`."""


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    prompt: Text
    chosen: Text
    rejected: Text
    example_id: int  # position in the dataset (files sorted, rows in order); stable across runs
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def sft_view(self) -> tuple[Text, Text]:
        """(prompt, target) for SFT / Preferred-FT: the preferred response is the target."""
        return self.prompt, self.chosen


@dataclasses.dataclass(frozen=True)
class Skip:
    reason: str
    where: str


Row = tuple[str, dict]  # (where = "file:line", parsed row)
Reader = Callable[[Row], Union[PreferenceExample, Skip]]


# ----- raw rows ---------------------------------------------------------------------------------------------------

_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


def data_files(path: str) -> list[str]:
    """The data files at `path` (a file, or every supported file in a directory, sorted)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(_EXTENSIONS))
        if not files:
            raise DataError(f"{path}: no data files ({', '.join(_EXTENSIONS)}) in this directory")
        return files
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or directory")
    if not path.endswith(_EXTENSIONS):
        raise DataError(f"{path}: unsupported file type (supported: {', '.join(_EXTENSIONS)})")
    return [path]


def iter_rows(path: str) -> Iterator[Row]:
    """(where, row) for every row of every data file at `path`; JSON lines or parquet."""
    for file in data_files(path):
        if file.endswith(".parquet"):
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(file).to_pylist(), start=1):
                yield f"{file}:row {i}", row
            continue
        opener = gzip.open if file.endswith(".gz") else open
        with opener(file, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{file}:{i}: expected a JSON object, got {type(row).__name__}")
                yield f"{file}:{i}", row


def _get(row: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _messages(value: Any, key: str, where: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of messages")
    out = []
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: field {key!r}[{j}] must be {{'role': str, 'content': str}}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _pair_check(prompt: Text, chosen: Text, rejected: Text, where: str) -> Skip | None:
    def empty(t: Text) -> bool:
        return not (t.strip() if isinstance(t, str) else any(m["content"].strip() for m in t))

    if empty(chosen) or empty(rejected):
        return Skip("empty_response", where)
    if chosen == rejected:
        return Skip("identical_responses", where)
    return None


def _example(where: str, prompt: Text, chosen: Text, rejected: Text, **meta: Any) -> PreferenceExample | Skip:
    bad = _pair_check(prompt, chosen, rejected, where)
    if bad:
        return bad
    return PreferenceExample(prompt, chosen, rejected, -1, {"source": where, **meta})


# ----- the formats ------------------------------------------------------------------------------------------------

def split_hh(text: str) -> tuple[str, str] | None:
    """Anthropic HH: prompt = everything up to and including the last '\\n\\nAssistant:', response = the rest."""
    idx = text.rfind(HH_ASSISTANT)
    if idx < 0:
        return None
    cut = idx + len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def read_hh(item: Row) -> PreferenceExample | Skip:
    where, row = item
    chosen, rejected = _get(row, "chosen", str, where), _get(row, "rejected", str, where)
    split = split_hh(chosen)
    if split is None:
        return Skip("no_assistant_turn", where)
    prompt, chosen_response = split
    if not rejected.startswith(prompt):
        return Skip("prompt_mismatch", where)  # the authors' code assumes one prompt for both
    return _example(where, prompt, chosen_response, rejected[len(prompt):])


def read_shp(item: Row, min_score_ratio: float = 2.0) -> PreferenceExample | Skip:
    """SHP as the authors' code: pairs with score ratio >= `min_score_ratio`, responses with a leading space."""
    where, row = item
    history = _get(row, "history", str, where)
    a, b = _get(row, "human_ref_A", str, where), _get(row, "human_ref_B", str, where)
    label = _get(row, "labels", int, where)
    score_a, score_b = _get(row, "score_A", (int, float), where), _get(row, "score_B", (int, float), where)
    if min(score_a, score_b) <= 0 or max(score_a / score_b, score_b / score_a) < min_score_ratio:
        return Skip("score_ratio_below_threshold", where)
    prompt = f"\n\nHuman: {history}{HH_ASSISTANT}"
    chosen, rejected = (" " + a, " " + b) if label == 1 else (" " + b, " " + a)
    return _example(where, prompt, chosen, rejected, score_ratio=max(score_a / score_b, score_b / score_a))


def read_tldr(item: Row) -> PreferenceExample | Skip:
    """OpenAI summarize-from-feedback comparisons: prompt 'SUBREDDIT: r/..\\nTITLE: ..\\nPOST: ..\\nTL;DR:'."""
    where, row = item
    info = _get(row, "info", dict, where)
    summaries = _get(row, "summaries", list, where)
    choice = _get(row, "choice", int, where)
    if len(summaries) != 2 or not all(isinstance(s, dict) and isinstance(s.get("text"), str) for s in summaries):
        raise DataError(f"{where}: field 'summaries' must be two objects with a 'text' string")
    if choice not in (0, 1):
        raise DataError(f"{where}: field 'choice' must be 0 or 1, got {choice}")
    if info.get("post") is None and isinstance(info.get("article"), str):
        return Skip("not_reddit_post", where)  # the CNN/DailyMail rows of the comparisons
    for key in ("subreddit", "title", "post"):
        if not isinstance(info.get(key), str):
            raise DataError(f"{where}: field 'info.{key}' must be a string")
    prompt = f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\nPOST: {info['post']}\nTL;DR:"
    return _example(where, prompt, summaries[choice]["text"], summaries[1 - choice]["text"])


def read_ultrafeedback(item: Row) -> PreferenceExample | Skip:
    """UltraFeedback binarized: `chosen`/`rejected` are whole conversations; the prompt is all but the last turn."""
    where, row = item
    chosen, rejected = _messages(row.get("chosen"), "chosen", where), _messages(row.get("rejected"), "rejected", where)
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return Skip("last_turn_not_assistant", where)
    if chosen[:-1] != rejected[:-1]:
        return Skip("prompt_mismatch", where)
    meta = {k: row[k] for k in ("score_chosen", "score_rejected") if k in row}
    return _example(where, chosen[:-1], chosen[-1:], rejected[-1:], **meta)


def _common_prefix_len(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _margin(row: dict, where: str) -> dict[str, float]:
    """The optional per-pair `margin` (preference strength, reward-model training) as meta."""
    if "margin" not in row:
        return {}
    value = row["margin"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise DataError(f"{where}: field 'margin' must be a finite number, got {value!r}")
    return {"margin": float(value)}


def read_generic(item: Row) -> PreferenceExample | Skip:
    """prompt/chosen/rejected strings or message lists; without `prompt`, the prompt is the longest common prefix
    of chosen and rejected (messages, or text). An optional number `margin` is kept for reward-model training."""
    where, row = item
    meta = _margin(row, where)
    chosen, rejected = row.get("chosen"), row.get("rejected")
    conversational = isinstance(chosen, list)
    if conversational:
        chosen, rejected = _messages(chosen, "chosen", where), _messages(rejected, "rejected", where)
    else:
        chosen, rejected = _get(row, "chosen", str, where), _get(row, "rejected", str, where)
    if "prompt" in row:
        prompt = row["prompt"]
        if conversational:
            prompt = ({"role": "user", "content": prompt},) if isinstance(prompt, str) else _messages(
                prompt, "prompt", where)
        elif not isinstance(prompt, str):
            raise DataError(f"{where}: field 'prompt' must be str when chosen/rejected are strings")
        return _example(where, prompt, chosen, rejected, **meta)
    n = _common_prefix_len(chosen, rejected)
    if n == 0 or n == min(len(chosen), len(rejected)):
        return Skip("no_common_prompt", where)
    return _example(where, chosen[:n], chosen[n:], rejected[n:], **meta)


def detect_format(row: dict, where: str) -> str:
    """The format a row's fields say it is in."""
    if {"info", "summaries", "choice"} <= row.keys():
        return "tldr"
    if {"history", "human_ref_A", "human_ref_B"} <= row.keys():
        return "shp"
    chosen = row.get("chosen")
    whole_conversation = isinstance(chosen, list) and chosen and isinstance(chosen[0], dict) and \
        chosen[0].get("role") != "assistant"
    if whole_conversation and isinstance(row.get("prompt"), str) and "rejected" in row:
        return "ultrafeedback"  # prompt string + chosen/rejected conversations that repeat it
    if {"chosen", "rejected"} <= row.keys():
        if "prompt" not in row and isinstance(chosen, str) and HH_ASSISTANT in chosen:
            return "hh"
        return "generic"
    raise DataError(f"{where}: cannot tell the data format from fields {sorted(row)}; set data.format to one of "
                    f"{', '.join(FORMATS)}")


def read_examples(
    path: str,
    format: str | None = None,
    *,
    shp_min_score_ratio: float = 2.0,
) -> Iterator[PreferenceExample | Skip]:
    """Every row at `path` as a PreferenceExample (with its dataset-wide example_id) or a Skip."""
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; valid: {', '.join(FORMATS)}")
    readers: dict[str, Reader] = {
        "hh": read_hh,
        "shp": lambda r: read_shp(r, shp_min_score_ratio),
        "tldr": read_tldr,
        "ultrafeedback": read_ultrafeedback,
        "generic": read_generic,
    }
    next_id = 0
    for item in iter_rows(path):
        fmt = format or detect_format(item[1], item[0])
        format = fmt  # the first row decides for the whole dataset
        out = readers[fmt](item)
        if isinstance(out, PreferenceExample):
            out = dataclasses.replace(out, example_id=next_id)
            next_id += 1
        yield out
