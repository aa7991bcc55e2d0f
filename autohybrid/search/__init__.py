"""search: per-layer method / rank / sparsity allocation under a budget (Optuna, Ray Tune)."""
