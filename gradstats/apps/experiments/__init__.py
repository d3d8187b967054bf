"""The experiments of ``gradstats experiment`` (:mod:`.command`): E1 critical batch, E2 best SGD
learning rate, the Adam surge, E3 closed-loop batch size; results and budgets in
``docs/experiments/README.md``."""
