"""Offline analysis of recorded feature trajectories (issue 5): Gaussianity of the divided
differences and offline replay of every forecasting basis. Run from the repository root as
``python -m analysis.gaussianity ...`` and ``python -m analysis.forecast_error ...``."""
