"""The chaos soak's parts (``bench/soak.py`` runs them): processes, stacks, devices,
the chaos schedule and the checks."""
