//! What a run measures, for either objective: each step's report and each held-out
//! evaluation. The parts every objective has are plain fields; each objective's own numbers
//! sit in one variant, so neither carries the other's.

use serde::{Deserialize, Serialize};

/// What one training step measured (before its update).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    /// The objective's loss: L_sep + λ·L_KL for ES2, the mean cross-entropy per learned token
    /// for SFT.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (non-padding) tokens processed.
    pub tokens: usize,
    #[serde(flatten)]
    /// The objective's own terms.
    pub terms: Terms,
}

/// The objective's own parts of a step's report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Terms {
    /// An ES2 step.
    Es2(Es2Terms),
    /// An SFT step.
    Sft(SftTerms),
}

/// ES2's terms: separation, KL and the per-layer distances.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Es2Terms {
    /// L_sep, the mean over the chosen layers of φ(D_l).
    pub sep: f64,
    /// L_KL per real harmless position.
    pub kl: f64,
    /// D_l per chosen layer.
    pub distance: Vec<f32>,
    /// D_l / D_l(base) per chosen layer.
    pub relative_distance: Vec<f32>,
}

/// SFT's terms.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SftTerms {
    /// Tokens the loss counted (the learned tokens of the batch).
    pub learned_tokens: usize,
}

impl StepReport {
    /// The first of the step's terms that is NaN or infinite, by name (L_sep, L_KL, the
    /// cross-entropy, then the gradient norm), with its value.
    pub fn nonfinite_term(&self) -> Option<(&'static str, f64)> {
        let loss_terms: Vec<(&'static str, f64)> = match &self.terms {
            Terms::Es2(t) => vec![("L_sep", t.sep), ("L_KL", t.kl)],
            Terms::Sft(_) => vec![("the cross-entropy", self.loss)],
        };
        loss_terms
            .into_iter()
            .chain([("the gradient norm", self.grad_norm)])
            .find(|(_, v)| !v.is_finite())
    }

    /// Whether the GPU applied this step's update: it skips any update whose gradient norm is
    /// not finite.
    pub fn update_applied(&self) -> bool {
        self.grad_norm.is_finite()
    }

    /// The ES2 terms, for an ES2 step.
    pub fn es2(&self) -> Option<&Es2Terms> {
        match &self.terms {
            Terms::Es2(t) => Some(t),
            Terms::Sft(_) => None,
        }
    }

    /// The SFT terms, for an SFT step.
    pub fn sft(&self) -> Option<&SftTerms> {
        match &self.terms {
            Terms::Sft(t) => Some(t),
            Terms::Es2(_) => None,
        }
    }
}

/// Held-out measurements at one point of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Steps completed when it was measured.
    pub step: usize,
    #[serde(flatten)]
    /// The objective's numbers.
    pub held_out: HeldOut,
}

/// The objective's held-out numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeldOut {
    /// Held-out separation and KL.
    Es2(Es2HeldOut),
    /// Held-out cross-entropy.
    Sft(SftHeldOut),
}

/// ES2 on held-out prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Es2HeldOut {
    /// D_l on held-out prompts (normalised by the training ν_l as in the objective).
    pub distance: Vec<f64>,
    /// T²·KL(base ‖ tuned) per held-out harmless token (the objective's direction and T).
    pub kl: f64,
}

/// SFT on held-out conversations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftHeldOut {
    /// Mean cross-entropy per learned token of the held-out conversations (nats).
    pub loss: f64,
}

impl Evaluation {
    /// The ES2 numbers, for an ES2 run.
    pub fn es2(&self) -> Option<&Es2HeldOut> {
        match &self.held_out {
            HeldOut::Es2(e) => Some(e),
            HeldOut::Sft(_) => None,
        }
    }

    /// The SFT numbers, for an SFT run.
    pub fn sft(&self) -> Option<&SftHeldOut> {
        match &self.held_out {
            HeldOut::Sft(e) => Some(e),
            HeldOut::Es2(_) => None,
        }
    }
}
