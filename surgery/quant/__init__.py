"""Quantizers and packed formats for the `bits` op."""
