"""drip: timed onboarding emails for new patients of a ketamine-therapy clinic."""

__version__ = "0.1.0"
