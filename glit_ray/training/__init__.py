"""Training on Ray Train: the recipe, the data and how workers read it, the epoch loop, fitting and resuming a run,
the scoring sets, the supernet's verdict, and networks trained on their own as Tune trials (the shortlist's and the
audit's)."""
