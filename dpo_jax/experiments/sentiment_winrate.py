"""The sentiment experiment's win rates (the paper's Fig. 2 right), generalization (§6.3) and judge validation (§6.4),
in miniature.

- Win rate vs temperature: each policy completes `winrate.prefixes` held-out movie-review prefixes at every
  temperature of `winrate.temperatures` (0 = greedy); VADER judges each completion against the same sentence's
  human-written continuation (the analogue of TL;DR's reference summaries) cut to the policy's token budget (like
  terms: length moves VADER), ties counted half, 95 % Wilson intervals, with each side's mean length, the EOS rate and
  the length-controlled win rate (evaluation/winrate.py).
- Generalization: the same policies, trained on movie reviews only, complete prefixes of Amazon product reviews,
  NYT editorials and tweets (the vaderSentiment archive's other ground-truth files; the analogue of evaluating
  TL;DR policies on CNN/DailyMail) at temperature 1: mean VADER reward and win rate against the human continuation.
- Judge validation: on random pairs of held-out sentences, how often each judge (VADER; the learned reward model)
  orders the pair as the mean human ratings do — per domain for VADER.

One compiled `generate` serves every policy, temperature and domain: a policy's rows (all temperatures, all domains)
go through it in fixed-size chunks with per-row temperatures.
"""

from __future__ import annotations

import csv
import json
import os
import time
from typing import Any

import jax
import numpy as np

from dpo_jax.evaluation import intervals, winrate
from dpo_jax.evaluation.judges import ScoreJudge, pair_agreement
from dpo_jax.evaluation.sampling import check_temperatures, decode_completions, token_lengths
from dpo_jax.experiments import sentiment_corpus as corpus
from dpo_jax.experiments.sentiment_points import family
from dpo_jax.experiments.sentiment_report import COLORS
from dpo_jax.models.generate import SamplingConfig, generate_chunks

CHUNK = 1024  # rows per generate call
COMPARED = ("DPO", "PPO", "PPO-GT", "Online DPO")  # the families whose chosen settings the summary compares


class WinRates:
    def __init__(self, st: Any):
        self.st, w = st, st.c.winrate
        self.temps = check_temperatures(w.temperatures, "winrate.temperatures")
        self.judge = ScoreJudge("VADER", st.reward)
        self.sets = {"movies": self._prefix_set(st.test_ids, w.prefixes, st.c.seed + 4),
                     # other held-out sentences (after the test prefixes' in the same draw): where each family's
                     # setting for the comparison is chosen
                     "validation": self._prefix_set(st.test_ids, w.prefixes, st.c.seed + 4, skip=st.c.eval.prefixes)}
        self.snippets = {"movies": st.test_text}
        for d, domain in enumerate(w.domains):
            snippets = corpus.read_snippets(corpus.fetch_corpus(os.path.dirname(st.cache), domain))
            self.snippets[domain] = snippets
            self.sets[domain] = self._prefix_set([st.encode(s.text) for s in snippets], w.prefixes,
                                                 st.c.seed + 10 + d)
        self.rows: list[dict[str, Any]] = []  # win rate per method and temperature (movies), first seed
        self.domain_rows: list[dict[str, Any]] = []  # reward and win rate per method and domain (temperature 1)
        # per (method, seed, block): the per-prompt outcomes behind the intervals ("win": 1 / ½ / 0, "reward")
        self.outcomes: dict[tuple[str, int, str, float], dict[str, np.ndarray]] = {}
        self.first_seed: dict[str, int] = {}
        self.seconds = 0.0

    def _prefix_set(self, ids: list[list[int]], n: int, seed: int, skip: int = 0) -> dict[str, Any]:
        """Prefixes as the experiment draws them, with each sentence's human continuation as text — cut to the
        policy's budget (eval.max_new_tokens), so that both sides of a comparison may be equally long."""
        st = self.st
        prompts, mask, rows, lengths = st.prefixes(ids, n, seed, sources=True, skip=skip)
        dec, budget = st.tokenizer.decode, st.c.eval.max_new_tokens
        human = [ids[r][k:k + budget] for r, k in zip(rows, lengths)]
        return {"ids": prompts, "mask": mask, "prefix": [dec(ids[r][:k]) for r, k in zip(rows, lengths)],
                "human": [dec(h) for h in human], "human_length": np.asarray([len(h) for h in human])}

    def add(self, method: str, params: Any, seed: int = 0) -> None:
        """Samples a method's policy (trained at `seed`) on every prompt set and judges the completions; the
        tables show each method's first seed, the comparisons' intervals use every seed added."""
        t0 = time.perf_counter()
        st = self.st
        first = self.first_seed.setdefault(method, seed) == seed
        domains = self.st.c.winrate.domains
        blocks = [("movies", t) for t in self.temps] + [("validation", t) for t in self.temps] + [
            (d, 1.0) for d in domains]
        ids = np.concatenate([self.sets[d]["ids"] for d, _ in blocks])
        mask = np.concatenate([self.sets[d]["mask"] for d, _ in blocks])
        temps = np.concatenate([np.full(len(self.sets[d]["ids"]), t, np.float32) for d, t in blocks])
        keys = jax.random.split(jax.random.key(st.c.seed + 8), len(ids))
        sampling = SamplingConfig(max_new_tokens=st.c.eval.max_new_tokens, eos_id=st.eos, pad_id=st.pad)
        out = generate_chunks(params, st.model_config(), ids, mask, keys, sampling, temps, CHUNK)
        texts = decode_completions(st.tokenizer)(out.tokens, out.mask)
        length, eos = token_lengths(out.tokens, out.mask, st.eos)
        offset = 0
        for domain, t in blocks:
            block = self.sets[domain]
            here = slice(offset, offset + len(block["ids"]))
            mine, offset = texts[here], here.stop
            wins = self.judge.compare(block["prefix"], mine, block["human"])
            rewards = self.judge.scores([p + x for p, x in zip(block["prefix"], mine)])
            self.outcomes[(method, seed, domain, t)] = {"win": wins, "reward": rewards}
            rate = {**winrate.win_rate(wins),
                    **winrate.length_fields(wins, length[here], eos[here], block["human_length"])}
            if domain == "movies" and first:
                self.rows.append({"method": method, "temperature": t, **rate})
            if t == 1.0 and domain != "validation" and first:  # generalization: every domain at temperature 1
                self.domain_rows.append({"method": method, "domain": domain, "reward": float(rewards.mean()),
                                         **rate})
        self.seconds += time.perf_counter() - t0

    def validation(self, rm_test_scores: np.ndarray | None) -> list[dict[str, Any]]:
        """Judge-vs-human agreement on random pairs of held-out sentences (VADER per domain; the reward model on the
        movie-review test split)."""
        st, n = self.st, self.st.c.winrate.validation_pairs
        rng = np.random.default_rng(st.c.seed + 9)
        out = []
        for domain, snippets in self.snippets.items():
            human = np.asarray([s.rating for s in snippets])
            pairs = rng.integers(0, len(snippets), (n, 2))
            pairs = pairs[pairs[:, 0] != pairs[:, 1]]
            vader = st.test_vader if domain == "movies" else st.reward([s.text for s in snippets])
            out.append({"judge": "VADER", "domain": domain, **pair_agreement(vader, human, pairs)})
            if domain == "movies" and rm_test_scores is not None:
                out.append({"judge": "learned reward model", "domain": domain,
                            **pair_agreement(rm_test_scores, human, pairs)})
        return out

    def write(self, out_dir: str, validation: list[dict[str, Any]], kl: dict[str, float]) -> list[str]:
        """winrate.csv/md/png, generalization.csv and winrate_outcomes.jsonl (per method, seed, prefix set and
        temperature: every prompt's outcome and reward); returns results.md's lines (kl: each method's final KL)."""
        baseline = (f"the human-written continuation of the same held-out sentence, cut to the policy's "
                    f"{self.st.c.eval.max_new_tokens}-token budget")
        with open(os.path.join(out_dir, "winrate_outcomes.jsonl"), "w") as f:  # every interval recomputable
            for (method, seed, domain, t), o in self.outcomes.items():
                f.write(json.dumps({"method": method, "seed": seed, "prefixes": domain, "temperature": t,
                                    "win": [None if w != w else float(w) for w in o["win"]],
                                    "reward": [float(r) for r in o["reward"]]}) + "\n")
        winrate.write_tables(self.rows, out_dir, baseline=baseline, judge="VADER")
        self._plot(os.path.join(out_dir, "winrate.png"))
        with open(os.path.join(out_dir, "generalization.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["method", "domain", "reward", "win_rate", "low", "high", "valid"],
                               extrasaction="ignore")
            w.writeheader()
            w.writerows(self.domain_rows)
        domains = list(dict.fromkeys(r["domain"] for r in self.domain_rows))
        human = {d: float(self.judge.scores([p + h for p, h in zip(s["prefix"], s["human"])]).mean())
                 for d, s in self.sets.items()}
        lines = ["", "## Win rate vs sampling temperature (the paper's Figure 2, right)", "",
                 f"Each final policy completes {len(self.sets['movies']['ids'])} held-out movie-review prefixes at "
                 "each temperature (winrate.png plots each family's setting chosen on validation prefixes, below).", "",
                 winrate.markdown_table(self.rows, baseline=baseline, judge="VADER"), "",
                 winrate.length_table(self.rows), "",
                 "## Generalization to new input distributions (§6.3)", "",
                 f"The same policies (trained on movie reviews only) on {len(self.sets['movies']['ids'])} prefixes per "
                 "domain, sampled at temperature 1: mean VADER reward / win rate against the human continuation. "
                 "First row: the human continuations' own reward.", "",
                 "| method | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains),
                 "| human continuation | " + " | ".join(f"{human[d]:+.3f} / —" for d in domains) + " |"]
        by = {(r["method"], r["domain"]): r for r in self.domain_rows}
        for m in dict.fromkeys(r["method"] for r in self.domain_rows):
            lines.append(f"| {m} | " + " | ".join(f"{by[(m, d)]['reward']:+.3f} / {100 * by[(m, d)]['win_rate']:.0f} %"
                                                  for d in domains) + " |")
        lines += self._summary(domains, kl)
        lines += ["", "## Judge validation (§6.4)", "",
                  "How often a judge orders a random pair of held-out human-written sentences as their mean human "
                  "ratings do (pairs the humans rate equally left out; judge ties count half):", ""]
        lines += [f"- {v['judge']} on {v['domain']}: {100 * v['agreement']:.1f} % of {v['pairs']} pairs "
                  f"[{100 * v['low']:.1f}, {100 * v['high']:.1f}]" for v in validation]
        lines += ["", f"Sampling and judging for these sections took {self.seconds:.0f} s."]
        return lines

    def _best(self, fam: str) -> str | None:
        """A family's setting for the comparison: the best mean win rate over temperatures and seeds on the
        validation prefixes (never on the prefixes it is reported on)."""
        names = [m for m in self.first_seed if family(m) == fam]
        mean = {m: np.mean([o["win"] for (m2, _, d, _), o in self.outcomes.items() if m2 == m and d == "validation"])
                for m in names}
        return max(names, key=mean.get) if names else None

    def _per_seed(self, method: str, domain: str, t: float, key: str) -> np.ndarray:
        """[seeds, prompts] outcomes of a method on a block."""
        return np.stack([o[key] for (m, _, d, t2), o in self.outcomes.items() if (m, d, t2) == (method, domain, t)])

    def _summary(self, domains: list[str], kl: dict[str, float]) -> list[str]:
        """DPO's chosen setting against PPO's, PPO-GT's and online DPO's: win-rate differences per temperature and
        reward differences per new domain, each with its 95 % interval over seeds and prompts (paired by prompt)."""
        best = {f: self._best(f) for f in COMPARED}
        if not best["DPO"]:
            return []
        seeds = {f: len(self._per_seed(m, "movies", self.temps[0], "win")) for f, m in best.items() if m}
        lines = ["", "Each family's setting chosen on validation prefixes (other held-out sentences) by mean win rate "
                 "over the temperatures: " + ", ".join(f"{f} {m} (KL {kl.get(m, float('nan')):.1f}, {seeds[f]} "
                                                       f"seed(s))" for f, m in best.items() if m) +
                 ". Differences below are DPO's minus the other's on the test prefixes, with 95 % bootstrap intervals "
                 "over seeds and prompts (paired by prompt): \"ahead\" only where the interval excludes 0. Win rates "
                 "do not hold KL fixed; the frontier above does."]
        for f in COMPARED[1:]:
            if best[f]:
                diffs = [(t, intervals.difference_interval(self._per_seed(best["DPO"], "movies", t, "win"),
                                                           self._per_seed(best[f], "movies", t, "win")))
                         for t in self.temps]
                ahead = sum(d.verdict == "ahead" for _, d in diffs)
                behind = sum(d.verdict == "behind" for _, d in diffs)
                lines.append(f"- Win rate, DPO − {f}: ahead at {ahead}, behind at {behind}, level at "
                             f"{len(diffs) - ahead - behind} of {len(diffs)} temperatures (" + "; ".join(
                                 f"T {t:g}: {100 * d.estimate:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}] points"
                                 for t, d in diffs) + ").")
        new = [d for d in domains if d != "movies"]
        for f in COMPARED[1:]:
            if best[f] and new:
                diffs = [(d, intervals.difference_interval(self._per_seed(best["DPO"], d, 1.0, "reward"),
                                                           self._per_seed(best[f], d, 1.0, "reward"))) for d in new]
                lines.append(f"- New domains (temperature 1), mean reward DPO − {f}: " + "; ".join(
                    f"{d} {g.text()} ({g.verdict})" for d, g in diffs) + ".")
        return lines

    def _plot(self, path: str) -> None:
        keep = {self._best(f) for f in dict.fromkeys(family(m) for m in self.first_seed)}
        rows = [r for r in self.rows if r["method"] in keep]
        winrate.plot(rows, path,
                     title="win rate vs the human continuation (VADER); each family's setting chosen on validation",
                     colours={m: COLORS.get(family(m)) for m in keep},
                     labels={m: f"{family(m)} ({m})" for m in keep})
