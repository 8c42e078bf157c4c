"""linking package."""
