"""groundloop evolver service."""
