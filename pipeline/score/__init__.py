"""`atlas score`: the Machine Interpretability Score of every unit (docs/score.md).

The choices the command line offers live here (importing them loads neither torch nor Ray)."""

SIMILARITIES = ("pooled", "dreamsim")
EXECUTORS = ("ray", "local")
