"""Input pipeline: sources, tokenizer, tasks, temperature mixture, grain pipeline."""
