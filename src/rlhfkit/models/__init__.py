"""Policies: loading causal and seq2seq models."""
