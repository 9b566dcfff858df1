"""Models: where weights and tokenizers come from (packaged, a folder, the Hub, scratch), the model families as a
table, parameter names -> buckets, the one variant builder with the one freezing function, and a tokenizer trained
on the corpus."""
