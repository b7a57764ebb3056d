"""An LLM judge's verdicts: the letter read from a reply, the order each comparison is shown in, and what asking
both orders reveals (position bias).

A verdict is read from the reply's last non-empty line only: markup (`**`, backticks, headings), straight and curly
quotes and brackets are dropped; what is left must be the letter A or B — optionally named (`Summary A`,
`Response B`), followed by a parenthetical (`A (more concise)`) or `.`/`!` — after nothing or after a label
(`Preferred:`, `More helpful:`, `Answer:`, …). Nothing looser: a sentence ending in `: a` is no verdict, and a
reply naming neither side (or both) is invalid — counted, never scored.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_MARKUP = str.maketrans({c: " " for c in "*_`#>\"'“”‘’«»[]"})
_LABEL = re.compile(r"\s*(?:the\s+|my\s+)?(?:final\s+)?(?:preferred|preference|more\s+helpful|better|answer|verdict|"
                    r"choice|winner|decision|better\s+(?:summary|response|answer)|more\s+helpful\s+response)"
                    r"(?:\s+(?:summary|response|answer|choice))?\s*", re.IGNORECASE)
_ANSWER = re.compile(r"\s*(?:(?i:summary|response|option|answer|assistant)\s+)?([AB])\s*(?:\([^()]*\))?\s*[.!]*\s*")


def parse_verdict(reply: str) -> str | None:
    """'A' or 'B' from the reply's last non-empty line (module docstring); else None."""
    lines = [line for line in (reply or "").splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1].translate(_MARKUP).strip()
    label, colon, answer = last.rpartition(":")
    if colon and not _LABEL.fullmatch(label):
        return None
    match = _ANSWER.fullmatch(answer if colon else last)
    return match.group(1) if match else None


def swaps(n: int, seed: int) -> np.ndarray:
    """[n] bool: which comparisons show the candidate as B. Exactly ⌊n/2⌋ are swapped, chosen by `seed`."""
    return np.random.default_rng(seed).permutation(n) < n // 2


def both_orders(n: int, fraction: float, seed: int) -> np.ndarray:
    """[n] bool: the seeded subset of round(fraction · n) comparisons that are also asked in the other order."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"both_orders fraction = {fraction}: must lie in [0, 1]")
    return np.random.default_rng([seed, 1]).permutation(n) < round(fraction * n)


def candidate_outcome(verdict: str | None, candidate_shown_as_b: bool) -> float:
    """1 if the verdict picks the candidate, 0 the baseline, NaN for no verdict."""
    if verdict is None:
        return float("nan")
    return 1.0 if (verdict == "A") != bool(candidate_shown_as_b) else 0.0


def order_statistics(verdicts: Sequence[str | None], outcomes: np.ndarray, second: np.ndarray,
                     asked_twice: np.ndarray) -> dict[str, float]:
    """Position bias of one set of comparisons, as counts (which add up over sets) and the rates they give.
    verdicts: every letter the judge gave (both orders), None where invalid; outcomes [N]: the first order's
    outcome per comparison; second [N]: the other order's (NaN where not asked); asked_twice [N] bool.
    a_rate: the share of valid verdicts that say A (an unbiased judge on balanced orders: about ½); order_flips:
    of the comparisons asked both ways with two valid verdicts, the share whose winner changed with the order;
    consistent_win_rate: the win rate over those whose winner did not (ties count half)."""
    letters = [v for v in verdicts if v is not None]
    both = asked_twice & ~np.isnan(outcomes) & ~np.isnan(second)
    agree = both & (outcomes == second)
    counts = {"a_answers": sum(v == "A" for v in letters), "verdicts": len(letters),
              "asked_twice": int(asked_twice.sum()), "both_valid": int(both.sum()),
              "flipped": int((both & ~agree).sum()), "consistent": int(agree.sum()),
              "consistent_wins": float(outcomes[agree].sum())}
    return {**counts, **order_rates(counts)}


def order_rates(counts: dict[str, float]) -> dict[str, float]:
    """The rates of `order_statistics` from its counts (summed over several sets: a method's temperatures)."""
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"a_rate": ratio(counts["a_answers"], counts["verdicts"]),
            "order_flips": ratio(counts["flipped"], counts["both_valid"]),
            "consistent_win_rate": ratio(counts["consistent_wins"], counts["consistent"])}
