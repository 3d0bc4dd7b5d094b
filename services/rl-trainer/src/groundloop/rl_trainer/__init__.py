"""groundloop rl-trainer service."""
