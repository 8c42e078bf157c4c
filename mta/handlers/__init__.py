"""mta/handlers package."""
