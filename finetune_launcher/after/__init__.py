"""After training: loading a run's adapters onto their base, merging, evaluation and generation, shared by the
recipes (each recipe's own part: recipes/<name>/after.py, found through the recipe table; see parts.py)."""
