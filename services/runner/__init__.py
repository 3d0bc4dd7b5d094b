"""groundloop runner service."""
