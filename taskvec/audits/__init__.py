"""Audits: empirical privacy checks a site runs on its own model or vector (membership inference).

Imports any library layer below it (io, models, privacy, training, merging); never simulation.
"""
