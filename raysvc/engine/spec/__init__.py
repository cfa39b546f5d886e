"""Speculative decoding: proposers, lossless verification, and when to speculate at all."""
