"""survey-qa models components."""
