"""survey-qa pipeline."""
