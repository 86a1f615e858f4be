"""Training recipes: the distillation loop, the teacher recipe and the data they share."""
