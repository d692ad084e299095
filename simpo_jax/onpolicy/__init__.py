"""On-policy preference data (the SimPO v0.2 loop) and reward-model judging, in JAX.

    prompts ──> sampling (K answers per prompt, KV cache, per-row keys) ──> generate (shards)
            ──> reward (decoder + score head) ──> pairs (best/worst, ties dropped) ──> jsonl
    rm_eval: trained policy vs a baseline on held-out prompts, judged by the reward model.
"""
