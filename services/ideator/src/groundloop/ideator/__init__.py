"""groundloop ideator service."""
