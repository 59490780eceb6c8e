"""pivotal: select pivotal meta samples for meta re-weighting, in pure JAX."""
