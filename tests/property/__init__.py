"""Property suite: random models and training setups, every statistic against per-example
autograd in float64 (issue "Real training code: nothing silently wrong")."""
