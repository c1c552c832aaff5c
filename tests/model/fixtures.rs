//! Reading the reference files that `scripts/make_model_fixtures.py` wrote.

use std::path::PathBuf;

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// The models the fixture script made, with the dtype their weights are stored in.
pub const MODELS: [&str; 4] = [
    "llama-f32",
    "mistral-bf16-sharded",
    "qwen2-f16",
    "llama3-rope-bias",
];

/// transformers' outputs for one model.
pub struct Reference {
    pub batch: usize,
    pub seq: usize,
    pub ids: Vec<i32>,
    pub lengths: Vec<usize>,
    pub logits: Vec<f32>,
    pub vocab: usize,
    /// `[L + 1, B, T, C]`
    pub hidden_states: Vec<f32>,
    pub hidden: usize,
}

impl Reference {
    pub fn load(name: &str) -> Reference {
        let path = fixtures().join(format!("{name}.reference.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).expect("fixture parses");
        let read = |n: &str| {
            let t = st.tensor(n).expect("fixture tensor");
            (t.dtype(), t.shape().to_vec(), t.data().to_vec())
        };
        let (dt, shape, ids) = read("input_ids");
        assert_eq!(dt, Dtype::I32);
        let ints = |b: &[u8]| -> Vec<i32> {
            b.chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let floats = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let (_, _, lengths) = read("lengths");
        let (_, lshape, logits) = read("logits");
        let (_, hshape, hidden) = read("hidden_states");
        Reference {
            batch: shape[0],
            seq: shape[1],
            ids: ints(&ids),
            lengths: ints(&lengths).into_iter().map(|n| n as usize).collect(),
            logits: floats(&logits),
            vocab: lshape[2],
            hidden_states: floats(&hidden),
            hidden: hshape[3],
        }
    }

    /// The unpadded sequences.
    pub fn sequences(&self) -> Vec<Vec<u32>> {
        self.ids
            .chunks(self.seq)
            .zip(&self.lengths)
            .map(|(row, &n)| row[..n].iter().map(|&i| i as u32).collect())
            .collect()
    }

    /// Keeps the rows of `[B·T, width]` data that are real tokens.
    pub fn valid_rows<T: Copy>(&self, data: &[T], width: usize) -> Vec<T> {
        let mut out = Vec::new();
        for b in 0..self.batch {
            let start = b * self.seq * width;
            out.extend_from_slice(&data[start..start + self.lengths[b] * width]);
        }
        out
    }
}
