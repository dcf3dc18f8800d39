"""RL parts: the pure PPO/RLOO/GRPO math, rollouts (generation and scoring forwards), the policy+value
module and the PPO run state (checkpoints, resume, RNG streams)."""
