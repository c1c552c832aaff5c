//! Kernel tests: every op against its CPU f64 reference on seeded, odd-shaped inputs with
//! NaN-poisoned outputs; every backward also against finite differences of the reference.
//! One test binary for all families keeps link time down.

mod kl;
mod pool;
mod reduce;
mod residual;
mod separation;
