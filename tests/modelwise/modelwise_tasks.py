"""The task names of the model-wise test pool (a module of its own: several test folders have a conftest)."""

TASKS = ("reviews_a", "reviews_b", "reviews_c")
