//! White-box attacks on a model's refusals, each adaptive (fitted to the evaluated model's own
//! weights and hidden states) and each ending in greedy replies to the same harmful prompts:
//!
//! - [`scav`]: SCAV's embedding attack, per-layer probes and their closed-form step;
//! - [`repe`]: RepE steering along the harmless − harmful direction, swept in strength;
//! - [`ablation`]: the refusal direction projected out of the residual stream;
//! - [`soft_prompt`]: free input embeddings optimised towards an affirmative reply;
//! - [`gcg`]: a discrete suffix search guided by token gradients.
//!
//! Every attack is hooks and gradient taps of the model's one block loop: none runs a forward
//! of its own.

pub mod ablation;
pub mod gcg;
pub mod repe;
pub mod scav;
pub mod soft_prompt;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::layers::{Embeddings, LayerFindings};
use super::prompts::Drawn;
use super::replies::{generate_replies, Replies};
use super::report::Field;
use super::run::EvalObserver;
use super::subject::Subject;
use crate::gpu::Gpu;
use crate::model::Hook;
use crate::{Error, Result};

/// An attack (direct inquiry counts as one: no attack at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// The prompt as it is.
    Direct,
    /// SCAV's embedding attack ([`scav`]).
    Scav,
    /// RepE steering ([`repe`]).
    Repe,
    /// Refusal-direction ablation ([`ablation`]).
    Ablation,
    /// Free input embeddings ([`soft_prompt`]).
    SoftPrompt,
    /// GCG's suffix search ([`gcg`]).
    Gcg,
}

impl AttackKind {
    /// Every attack, in the order they run.
    pub const ALL: [AttackKind; 6] = [
        AttackKind::Direct,
        AttackKind::Scav,
        AttackKind::Repe,
        AttackKind::Ablation,
        AttackKind::SoftPrompt,
        AttackKind::Gcg,
    ];

    /// The name in the report and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            AttackKind::Direct => "direct",
            AttackKind::Scav => "scav",
            AttackKind::Repe => "repe",
            AttackKind::Ablation => "ablation",
            AttackKind::SoftPrompt => "soft-prompt",
            AttackKind::Gcg => "gcg",
        }
    }

    /// The attack called `name`.
    pub fn parse(name: &str) -> Result<AttackKind> {
        let name = name.trim();
        AttackKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = AttackKind::ALL.iter().map(|k| k.name()).collect();
                Error::InvalidArgument(format!(
                    "unknown attack '{name}' (attacks: {})",
                    names.join(", ")
                ))
            })
    }
}

/// Budgets and settings of every attack.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AttackSettings {
    /// SCAV's target probabilities and probe threshold.
    pub scav: scav::ScavSettings,
    /// RepE's coefficients and window.
    pub repe: repe::RepeSettings,
    /// Ablation's direction filters.
    pub ablation: ablation::AblationSettings,
    /// The soft prompt's size, steps and target.
    pub soft_prompt: soft_prompt::SoftPromptSettings,
    /// `None`: [`gcg::GcgSettings::for_parameters`] of the evaluated model.
    pub gcg: Option<gcg::GcgSettings>,
}

impl AttackSettings {
    /// The settings as report fields.
    pub fn fields(&self) -> Vec<Field> {
        vec![
            Field::new("scav", json_of(&self.scav)),
            Field::new("repe", json_of(&self.repe)),
            Field::new("ablation", json_of(&self.ablation)),
            Field::new("soft-prompt", json_of(&self.soft_prompt)),
            Field::new("gcg", json_of(&self.gcg)),
        ]
    }
}

/// Anything serialisable as a report value.
fn json_of<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// Everything an attack may use on one model.
pub struct AttackContext<'a> {
    /// The device the model lives on.
    pub gpu: &'a Gpu,
    /// The attacked model.
    pub subject: Subject<'a>,
    /// Per hidden state: geometry, probe, mean difference (from the probe prompts).
    pub findings: &'a [LayerFindings],
    /// The probe prompts' pooled embeddings at every hidden state.
    pub embeddings: &'a Embeddings,
    /// The drawn harmful prompts.
    pub harmful: &'a Drawn,
    /// The drawn harmless prompts.
    pub harmless: &'a Drawn,
    /// The answered prompts' ids.
    pub harmful_ids: &'a [Vec<u32>],
    /// The answered harmless prompts' ids.
    pub harmless_ids: &'a [Vec<u32>],
    /// Most new tokens of a reply.
    pub max_new_tokens: usize,
    /// Seed of every random choice an attack makes.
    pub seed: u64,
    /// Budgets and settings of the attacks.
    pub settings: &'a AttackSettings,
    /// Where the model came from (a folder or an embedded model's name): the tokenizer files
    /// of a model folder an attack writes.
    pub source: &'a str,
    /// Where ablation writes the model with its refusal direction orthogonalised out of the
    /// weights (`None`: it writes nothing).
    pub ablated_out: Option<PathBuf>,
}

impl AttackContext<'_> {
    /// The model's replies to the answered harmful prompts with `hooks` in its forward, as
    /// stage `stage` of `label`'s progress (a tick per reply).
    fn hooked_replies(
        &self,
        hooks: &[Hook],
        label: &str,
        stage: &str,
        observer: &mut dyn EvalObserver,
    ) -> Result<Replies> {
        observer.stage(label, stage, self.harmful_ids.len());
        let mut tick = || observer.advance();
        generate_replies(
            self.gpu,
            &self.subject,
            self.harmful_ids,
            hooks,
            self.max_new_tokens,
            &mut tick,
        )
    }
}

/// What one setting of an attack did to one model.
#[derive(Debug, Clone)]
pub struct AttackOutcome {
    /// What tells this row from others of the same attack (`p0`, `c`).
    pub settings: Vec<Field>,
    /// The attacked replies to the answered harmful prompts.
    pub replies: Replies,
    /// What it cost.
    pub effort: Vec<Field>,
}

/// Runs attack `kind` (not direct inquiry) on the context's model.
pub fn run(
    kind: AttackKind,
    context: &AttackContext,
    label: &str,
    observer: &mut dyn EvalObserver,
) -> Result<Vec<AttackOutcome>> {
    match kind {
        AttackKind::Direct => Err(Error::InvalidArgument(
            "direct inquiry is no attack to run".into(),
        )),
        AttackKind::Scav => scav::run(context, label, observer),
        AttackKind::Repe => repe::run(context, label, observer),
        AttackKind::Ablation => ablation::run(context, label, observer).map(|o| vec![o]),
        AttackKind::SoftPrompt => soft_prompt::run(context, label, observer).map(|o| vec![o]),
        AttackKind::Gcg => gcg::run(context, label, observer),
    }
}
