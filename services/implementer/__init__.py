"""groundloop implementer service."""
