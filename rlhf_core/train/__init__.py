"""The thin PPO runner: a producer that writes the run format (policy, value head, reference, rewards, GAE, PPO)."""
