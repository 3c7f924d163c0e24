"""Use cases: one typed request each (``requests``, importable without torch) and the one function that runs it."""
