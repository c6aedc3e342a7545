"""survey-qa flows."""
