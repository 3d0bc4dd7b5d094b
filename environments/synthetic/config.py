"""The synthetic environment's recipe: the constants an idea may change.

`run.py` (protected) imports this module and scores the values below.
"""

LEARNING_RATE = 1e-3  # step size (log scale, 1e-4 .. 1e-1)
MOMENTUM = 0.5  # 0 .. 0.99
WIDTH = 32  # model width (8 .. 512)
SCHEDULE = "constant"  # "constant", "linear" or "cosine"
USE_WARMUP = False

# Only makes the run take longer (a stand-in for a long GPU run); never changes the score.
SLEEP_SECONDS = 0.0
