//! A whole training step to time: the model, its seeded data and its engine (`lm-step`,
//! `es2-step`).

use super::{BenchConfig, BenchShape, Workload};
use crate::es2::engine::{measure_base_stats, Es2Engine, ModelPair};
use crate::es2::objective::Es2Config;
use crate::es2::optimizer::OptimizerConfig;
use crate::es2::report::StepReport;
use crate::es2::sft::SftEngine;
use crate::gpu::{Gpu, Tensor};
use crate::model::{
    Batch, Config, LoadOptions, LoraConfig, SeededInit, Targets, Trainable, Transformer,
    WeightsDtype,
};
use crate::Result;

/// A model, its data and its engine, ready to step.
pub(super) struct StepBench<'g> {
    gpu: &'g Gpu,
    engine: Engine,
    models: ModelPair,
    batches: Vec<Batch>,
}

enum Engine {
    Lm(Box<SftEngine>),
    Es2(Box<Es2Engine>),
}

/// The peer harnesses' optimizer (AdamW, lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay
/// 0.01, no clipping).
fn peer_optimizer() -> OptimizerConfig {
    OptimizerConfig {
        lr: 1e-3,
        weight_decay: 0.01,
        clip: 0.0,
        ..OptimizerConfig::default()
    }
}

impl<'g> StepBench<'g> {
    pub(super) fn new(
        gpu: &'g Gpu,
        config: &BenchConfig,
        model_config: Config,
        batch: usize,
        seq_len: usize,
        trainable: Trainable,
    ) -> Result<Self> {
        let vocab = model_config.vocab_size;
        let options = LoadOptions {
            weights: match config.shape {
                BenchShape::Mistral7b => WeightsDtype::F16,
                _ => config.weights,
            },
            ..LoadOptions::default()
        };
        let init = SeededInit { seed: 7, std: 0.02 };
        let load = || Transformer::from_source(gpu, model_config.clone(), &init, &options);
        let mut tuned = load()?;
        if trainable == Trainable::Lora {
            tuned.attach_lora(gpu, &LoraConfig::default(), 0)?;
        }
        let mut tokens = PeerTokens::new();
        match config.workload {
            Workload::LmStep => {
                let data = lm_batch(gpu, &mut tokens, batch, seq_len, vocab)?;
                let engine = SftEngine::new(gpu, &tuned, trainable, peer_optimizer(), 0.0)?;
                Ok(StepBench {
                    gpu,
                    engine: Engine::Lm(Box::new(engine)),
                    models: ModelPair {
                        tuned,
                        frozen: None,
                    },
                    batches: vec![data],
                })
            }
            _ => {
                let mut sequences = || -> Result<Batch> {
                    let rows: Vec<Vec<u32>> =
                        (0..batch).map(|_| tokens.take(seq_len, vocab)).collect();
                    Batch::new(gpu, &rows, vocab)
                };
                let (harmful, harmless) = (sequences()?, sequences()?);
                let frozen = match trainable {
                    Trainable::Full => Some(load()?),
                    Trainable::Lora => None,
                };
                let models = ModelPair { tuned, frozen };
                let objective = Es2Config::default();
                let stats = measure_base_stats(
                    gpu,
                    models.base_model(),
                    &objective,
                    std::slice::from_ref(&harmful),
                    std::slice::from_ref(&harmless),
                )?;
                let engine = Es2Engine::new(
                    gpu,
                    &models.tuned,
                    trainable,
                    objective,
                    peer_optimizer(),
                    stats,
                    0.0,
                )?;
                Ok(StepBench {
                    gpu,
                    engine: Engine::Es2(Box::new(engine)),
                    models,
                    batches: vec![harmful, harmless],
                })
            }
        }
    }

    pub(super) fn tokens(&self) -> usize {
        self.batches.iter().map(Batch::tokens).sum()
    }

    /// One step: wall milliseconds (submit to readback) and its loss.
    pub(super) fn timed(&mut self) -> Result<(f64, f64)> {
        let lr = peer_optimizer().lr;
        let started = std::time::Instant::now();
        let report: StepReport = match &mut self.engine {
            Engine::Lm(engine) => {
                engine.step(self.gpu, &self.models.tuned, &self.batches[0], lr, 0)?
            }
            Engine::Es2(engine) => engine.step(
                self.gpu,
                &self.models,
                &self.batches[0],
                &self.batches[1],
                lr,
                0,
            )?,
        };
        Ok((started.elapsed().as_secs_f64() * 1e3, report.loss))
    }
}

/// `batch` sequences of `seq_len` inputs, each position learning the next token of a
/// `seq_len + 1`-token stream: cross-entropy on every position, as the peers compute it.
fn lm_batch(
    gpu: &Gpu,
    tokens: &mut PeerTokens,
    batch: usize,
    seq_len: usize,
    vocab: usize,
) -> Result<Batch> {
    let streams: Vec<Vec<u32>> = (0..batch)
        .map(|_| tokens.take(seq_len + 1, vocab))
        .collect();
    let inputs: Vec<Vec<u32>> = streams.iter().map(|s| s[..seq_len].to_vec()).collect();
    let host: Vec<u32> = streams.iter().flat_map(|s| s[1..].to_vec()).collect();
    let mut data = Batch::new(gpu, &inputs, vocab)?;
    data.targets = Some(Targets {
        ids: Tensor::from_u32(gpu, [host.len()], &host)?,
        counted: host.len(),
        host,
    });
    Ok(data)
}

/// The peer harnesses' token stream (Burn's `make_tokens`, torch_bench.py's LCG): Knuth's
/// MMIX generator, the id from its high bits.
struct PeerTokens(u64);

impl PeerTokens {
    fn new() -> Self {
        PeerTokens(0x2545_F491_4F6C_DD1D)
    }

    fn take(&mut self, count: usize, vocab: usize) -> Vec<u32> {
        (0..count)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((self.0 >> 33) % vocab as u64) as u32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lm_batch_learns_every_position() {
        let gpu = crate::testing::gpu();
        let data = lm_batch(gpu, &mut PeerTokens::new(), 3, 5, 512).unwrap();
        let targets = data.targets.as_ref().unwrap();
        assert_eq!(targets.counted, 15);
        // Position t of a row predicts the stream's token t + 1: the next row's input.
        assert_eq!(targets.host[..4], data.padded_ids[1..5]);
    }
}
