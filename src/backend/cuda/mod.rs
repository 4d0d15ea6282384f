//! CUDA backend (feature `cuda`) (TODO).
