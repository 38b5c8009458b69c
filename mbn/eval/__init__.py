"""Evaluation: common-corruption robustness (CIFAR-10-C style generation, cache and metrics)."""
