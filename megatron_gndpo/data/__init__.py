"""Prompts (verl parquet schema) and tokenizers."""
