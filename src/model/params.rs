//! Where a model's initial weights come from: a checkpoint on disk, or a seeded initialiser
//! (the embedded default model), behind one trait so the loader has a single code path.

use std::ops::Range;

use super::weights::Checkpoint;
use crate::rng::Rng;
use crate::Result;

/// A source of named f32 tensors.
pub trait ParamSource {
    /// Whether the source has tensor `name`.
    fn contains(&self, name: &str) -> bool;
    /// Rows `rows` of tensor `name`, whose full shape must be `shape`.
    fn rows(&self, name: &str, shape: &[usize], rows: Range<usize>) -> Result<Vec<f32>>;
    /// All of tensor `name`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.rows(name, shape, 0..shape.first().copied().unwrap_or(1))
    }
}

impl ParamSource for Checkpoint {
    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }

    fn rows(&self, name: &str, shape: &[usize], rows: Range<usize>) -> Result<Vec<f32>> {
        self.load_f32_rows(name, shape, rows)
    }
}

/// Deterministic initialisation from a seed: norm weights 1, biases 0, matrices
/// N(0, std²), each tensor's stream derived from its name so that chunked and whole loads
/// agree and the result does not depend on loading order.
#[derive(Debug, Clone)]
pub struct SeededInit {
    /// The same seed gives the same weights on any machine (they are drawn on the host).
    pub seed: u64,
    /// Standard deviation of the matrices' entries.
    pub std: f64,
}

impl SeededInit {
    fn stream(&self, name: &str) -> Rng {
        // FNV-1a of the name, mixed with the seed.
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Rng::new(hash ^ self.seed.rotate_left(17))
    }
}

impl ParamSource for SeededInit {
    fn contains(&self, _name: &str) -> bool {
        true
    }

    fn rows(&self, name: &str, shape: &[usize], rows: Range<usize>) -> Result<Vec<f32>> {
        let row_len: usize = shape.iter().skip(1).product();
        let len = rows.len() * row_len;
        if name.ends_with("norm.weight") {
            return Ok(vec![1.0; len]);
        }
        if name.ends_with(".bias") {
            return Ok(vec![0.0; len]);
        }
        let mut rng = self.stream(name);
        // Skip the rows before the range so that a chunk equals the same rows of a whole load.
        for _ in 0..rows.start * row_len {
            rng.normal();
        }
        Ok(rng.normal_vec(len, self.std))
    }
}
