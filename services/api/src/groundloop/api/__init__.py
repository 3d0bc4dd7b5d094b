"""groundloop api service."""
