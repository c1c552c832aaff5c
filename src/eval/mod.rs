//! Layer 5 (above `model`, below `es2`): what a defence buys, measured. Held-out separation and
//! KL during training ([`heldout`]), refusal judges by keyword ([`judge`]), linear probes of the
//! embeddings ([`probe`]), the geometry of harmful and harmless embeddings per layer
//! ([`geometry`]) and the report that puts them side by side for a base and a hardened model
//! ([`report`]).
//!
//! Everything but the passes that produce embeddings works on host copies of pooled embeddings
//! in f64: a layer's embeddings of a group of prompts are a [`Rows`] view. It uses `gpu`, `ops`,
//! `text` and `model`, never `es2`.

pub mod attacks;
pub mod capability;
pub mod geometry;
pub mod heldout;
pub mod judge;
pub mod layers;
pub mod loss;
pub mod plots;
pub mod probe;
pub mod prompts;
pub mod refusal;
pub mod replies;
pub mod report;
pub mod run;
pub mod subject;

pub use attacks::{AttackKind, AttackSettings};
pub use run::{run_eval, EvalConfig, EvalObserver, Quiet, DEFAULT_MODEL};

use crate::{Error, Result};

/// The embeddings of one group of prompts at one layer: `len()` rows of `cols()` values,
/// row-major, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    data: &'a [f64],
    cols: usize,
}

impl<'a> Rows<'a> {
    /// Views `data` as rows of `cols` values; an error when `cols` is 0 or does not divide the
    /// length.
    pub fn new(data: &'a [f64], cols: usize) -> Result<Rows<'a>> {
        if cols == 0 || data.len() % cols != 0 {
            return Err(Error::InvalidArgument(format!(
                "{} values do not make rows of {cols}",
                data.len()
            )));
        }
        Ok(Rows { data, cols })
    }

    /// Values per row (the hidden size).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.data.len() / self.cols
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The rows in order.
    pub fn iter(&self) -> std::slice::ChunksExact<'a, f64> {
        self.data.chunks_exact(self.cols)
    }

    /// All values, row-major.
    pub fn data(&self) -> &'a [f64] {
        self.data
    }
}

/// An error unless both groups are non-empty, finite rows of the same width.
fn expect_two_groups(what: &str, a: Rows, b: Rows) -> Result<()> {
    if a.is_empty() || b.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{what} needs embeddings of both groups ({} harmful, {} harmless rows)",
            a.len(),
            b.len()
        )));
    }
    if a.cols() != b.cols() {
        return Err(Error::InvalidArgument(format!(
            "{what}: harmful rows have {} values, harmless rows {}",
            a.cols(),
            b.cols()
        )));
    }
    if !a.data().iter().chain(b.data()).all(|x| x.is_finite()) {
        return Err(Error::Numerical(format!(
            "{what}: the embeddings hold a non-finite value"
        )));
    }
    Ok(())
}
