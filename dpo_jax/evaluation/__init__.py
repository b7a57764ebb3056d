"""The paper's evaluation: win rates against a baseline across sampling temperatures, judged by a reward model, a
ground-truth function or an LLM behind an OpenAI-compatible endpoint (winrate.py, judges.py, endpoint.py,
sampling.py, winrate_eval.py)."""
