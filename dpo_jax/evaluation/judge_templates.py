"""The DPO paper's GPT-4 judge prompts (Rafailov et al. 2023, App. C.2) as templates with `{prompt}`, `{a}` and
`{b}` placeholders: the summarization prompt in its simple (S) and concise (C) variants — §6.4 found C agreed better
with humans, so `summarization` is C — and the dialogue prompt. `template` in the judge config is one of these names
or a path to a text file of your own with the same placeholders (write literal braces as `{{` and `}}`); the verdict
is read from the reply's last line (verdicts.py)."""

from __future__ import annotations

import hashlib
import os

_SUMMARIZATION_FORMAT = """

Post:
{prompt}

Summary A:
{a}

Summary B:
{b}

FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">
"""  # noqa: E501
# S, the simple variant
SUMMARIZATION_SIMPLE = ("Which of the following summaries does a better job of summarizing the most important points "
                        "in the given forum post?" + _SUMMARIZATION_FORMAT)

# C, the concise variant: the same question with "without ... details? A good summary is both precise and concise."
SUMMARIZATION = ("Which of the following summaries does a better job of summarizing the most important points in the "
                 "given forum post, without including unimportant or irrelevant details? A good summary is both "
                 "precise and concise." + _SUMMARIZATION_FORMAT)

DIALOGUE = """For the following query to a chatbot, which response is more helpful?

Query: {prompt}

Response A:
{a}

Response B:
{b}

FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
More helpful: <"A" or "B">
"""  # noqa: E501

TEMPLATES = {"summarization": SUMMARIZATION, "summarization_concise": SUMMARIZATION,
             "summarization_simple": SUMMARIZATION_SIMPLE, "dialogue": DIALOGUE}
PLACEHOLDERS = ("{prompt}", "{a}", "{b}")


def load_template(spec: str) -> str:
    """A built-in template by name, or a template file; one missing a placeholder is an error naming it."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if not os.path.isfile(spec):
        raise ValueError(f"judge template {spec!r}: not a built-in ({', '.join(TEMPLATES)}) and no such file")
    with open(spec, encoding="utf-8") as f:
        text = f.read()
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise ValueError(f"{spec}: the judge template lacks the placeholder(s) {', '.join(missing)}")
    try:
        text.format(prompt="", a="", b="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{spec}: the judge template has an unknown or malformed placeholder ({e}); write "
                         "literal braces as {{ and }}") from None
    return text


def template_version(spec: str, text: str) -> str:
    """What a verdict cache keys on besides the request: the template's name and a hash of its text (a template file
    edited in place is a new version)."""
    return f"{os.path.basename(spec)}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"
