"""Differentiable population engine: populations, contact graphs, models, estimators.

Pure torch. No networking, no Flower, no imports from the app packages.
"""
