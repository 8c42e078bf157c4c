"""dealmail package."""
