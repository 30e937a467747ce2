"""Orthogonal rotations for incoherence processing (randomized Hadamard, Kronecker random orthogonals)."""

from lowbit.rotations.hadamard import RandomizedHadamard, fwht, hadamard_matrix

__all__ = ["RandomizedHadamard", "fwht", "hadamard_matrix"]
