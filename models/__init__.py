"""survey-qa models."""
