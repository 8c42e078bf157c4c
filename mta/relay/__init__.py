"""mta/relay package."""
