"""Constrained generation: token vocabularies, grammar masking backends and AWRS conditions."""
