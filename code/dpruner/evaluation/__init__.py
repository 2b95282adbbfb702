"""Stage 4: perplexity, multiple choice by log-likelihood, generation + ROUGE, and the CLI runner."""
