"""Rank policies (uniform, energy, VBMF, budgets) and the one vocabulary of compression methods."""
