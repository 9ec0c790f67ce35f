"""The search: its settings, the evolution as a Tune `Searcher`, evaluator actors and the dispatch of candidates to
them, the candidates' Parquet, Pareto fronts and rankings."""
