"""Evaluation as the compression literature does it: per-class Dice per case, a paired test against the
original over cases, costs measured side by side, and the tables and plots that compare methods."""
