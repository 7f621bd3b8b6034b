"""Training, the WikiText-2 corpus and perplexity evaluation (the networks live in models/)."""
