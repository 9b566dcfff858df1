"""Data: reading labelled text (files, the built-in datasets, the Hub), cleaning and splitting it (the prepare
stage), tokenizing it with its length statistics and vocabulary coverage (the tokenization stage), and holding
tokenized splits in memory as length-grouped, dynamically padded batches."""
