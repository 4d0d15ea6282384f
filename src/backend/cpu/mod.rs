//! CPU backend: the readable reference implementation of every op (TODO).
