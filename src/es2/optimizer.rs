//! AdamW over the trainable parameters, with global-norm clipping and a learning-rate
//! schedule; the moments live on the GPU and a step needs no readback.

use serde::{Deserialize, Serialize};

use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::model::NamedParam;
use crate::ops::adamw::{adamw_step, AdamWStep};
use crate::ops::grad_norm::grad_norm_squared;
use crate::ops::residual::accumulate;
use crate::{Error, Result};

/// How the learning rate moves over the run.
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Linear warmup, then constant.
    #[default]
    Constant,
    /// Linear warmup, then cosine decay to zero at the last step.
    Cosine,
}

/// AdamW and schedule settings (`torch.optim.AdamW` names and defaults, ARCHITECTURE.md's lr).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct OptimizerConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the second moment's square root.
    pub eps: f64,
    /// Global gradient-norm clipping threshold (0 turns it off).
    pub clip: f64,
    /// The learning rate after warmup.
    pub schedule: Schedule,
    /// Warmup steps.
    pub warmup: usize,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            lr: 1e-4,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip: 1.0,
            schedule: Schedule::Constant,
            warmup: 0,
        }
    }
}

impl OptimizerConfig {
    /// An error naming the first field out of its range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, rule: &str, value: f64| {
            Err(Error::config(field, format!("{rule}, got {value}")))
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("optimizer.lr", "must be > 0", self.lr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("optimizer.weight_decay", "must be >= 0", self.weight_decay);
        }
        if !(self.clip.is_finite() && self.clip >= 0.0) {
            let rule = "must be >= 0 (0 turns clipping off)";
            return bad("optimizer.clip", rule, self.clip);
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("optimizer.beta1", "must be in [0, 1)", self.beta1);
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("optimizer.beta2", "must be in [0, 1)", self.beta2);
        }
        Ok(())
    }

    /// The learning rate of 1-based step `step` out of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if self.warmup > 0 && step <= self.warmup {
            return self.lr * step as f64 / self.warmup as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = total.saturating_sub(self.warmup).max(1) as f64;
                let progress = (step.saturating_sub(self.warmup) as f64 / span).min(1.0);
                self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// AdamW moments for each trainable tensor, in the order of [`crate::model::Gradients::named`].
#[derive(Debug)]
pub struct AdamW {
    /// The settings.
    pub config: OptimizerConfig,
    /// First moments, one per trainable tensor.
    pub m: Vec<Tensor>,
    /// Second moments, one per trainable tensor.
    pub v: Vec<Tensor>,
    /// Steps taken.
    pub step: u64,
    norm_sq: Tensor,
}

impl AdamW {
    /// Zero moments for `params`, at step 0.
    pub fn new(gpu: &Gpu, params: &[NamedParam], config: OptimizerConfig) -> Self {
        let zeros = || {
            params
                .iter()
                .map(|p| Tensor::zeros(gpu, p.param.shape().clone(), DType::F32))
                .collect()
        };
        AdamW {
            config,
            m: zeros(),
            v: zeros(),
            step: 0,
            norm_sq: Tensor::zeros(gpu, [1], DType::F32),
        }
    }

    /// Records one step at learning rate `lr`: the global squared gradient norm, then every
    /// tensor's clipped AdamW update. Returns the tensor holding the (pre-clip) squared norm.
    /// When that norm is not finite the GPU leaves every parameter and moment as it was; the
    /// caller then stops or calls [`AdamW::unstep`].
    pub fn record_step(
        &mut self,
        rec: &mut Recorder,
        params: &[NamedParam],
        lr: f64,
    ) -> Result<Tensor> {
        let grads: Vec<&Tensor> = params.iter().map(|p| &p.grad).collect();
        grad_norm_squared(rec, &grads, &self.norm_sq);
        self.step += 1;
        let step = self.step.to_string();
        if crate::failpoint::fires("nonfinite-gradient", &step) {
            let nan = Tensor::from_f32(rec.gpu(), [1], &[f32::NAN])?;
            accumulate(rec, &nan, &self.norm_sq, 1.0);
        }
        if crate::failpoint::fires("device-fault", &step) {
            let past_limit = (rec.gpu().limits().max_buffer_size / 4) as usize + 64;
            rec.zero(&Tensor::empty(rec.gpu(), [past_limit], DType::F32));
        }
        let step = AdamWStep {
            lr,
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            eps: self.config.eps,
            weight_decay: self.config.weight_decay,
            step: self.step,
            max_grad_norm: self.config.clip,
        };
        for ((p, m), v) in params.iter().zip(&self.m).zip(&self.v) {
            adamw_step(rec, &p.param, &p.grad, m, v, &self.norm_sq, &step);
        }
        Ok(self.norm_sq.clone())
    }

    /// Takes back the count of a step whose update the GPU skipped (a non-finite gradient
    /// norm), so that bias correction goes on as if it had never been recorded.
    pub fn unstep(&mut self) {
        self.step = self.step.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_hold_or_decay() {
        let mut c = OptimizerConfig {
            lr: 1.0,
            warmup: 4,
            ..OptimizerConfig::default()
        };
        assert_eq!(c.lr_at(1, 100), 0.25);
        assert_eq!(c.lr_at(4, 100), 1.0);
        assert_eq!(c.lr_at(50, 100), 1.0);
        c.schedule = Schedule::Cosine;
        assert_eq!(c.lr_at(4, 100), 1.0);
        assert!((c.lr_at(52, 100) - 0.5).abs() < 1e-12);
        assert!(c.lr_at(100, 100).abs() < 1e-12);
        assert!(OptimizerConfig { lr: 0.0, ..c }.validate().is_err());
    }
}
