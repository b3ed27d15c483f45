"""Online RL: rollouts, rewards, and the PPO / GRPO / RLOO update (see posttrain.stages.rl)."""
