"""The RLHF pipeline DPO replaces, as baselines: a Bradley-Terry reward model (reward_model.py) and Best-of-N
sampling ranked by it (best_of_n.py)."""
