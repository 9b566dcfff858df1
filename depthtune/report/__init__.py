"""The comparison report, from the records alone: rows with 95% intervals and paired tests, Pareto fronts, the
verdict, and its files (markdown, JSON, CSV, the offline HTML page, figures)."""
