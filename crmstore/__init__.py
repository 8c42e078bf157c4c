"""crmstore package."""
