"""The RLHF pipeline DPO replaces, as baselines: PPO with a KL penalty (ppo.py, ppo_math.py) and Best-of-N sampling
(best_of_n.py), both plugged into the one Trainer; the reward model they score with is models/reward.py."""
