"""Experiments layer: datasets, noise, Flax models and the paper's pipeline."""
