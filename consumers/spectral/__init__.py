"""Spectral helpers shared by spectral consumers: reference spectra I/O, energy axes,
edge-step normalisation."""
