"""survey-qa hpc."""
