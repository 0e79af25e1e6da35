"""Training: the plain loop, training jobs and their runner."""
