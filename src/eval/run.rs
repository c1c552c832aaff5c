//! `es2-wgpu eval` as a library call: [`run_eval`] loads the model (and the base model, with
//! `base`), draws the held-out prompts, measures every model on the same prompts — geometry
//! per layer, replies to direct inquiry and under each attack, capability — and writes the
//! report and its plots.

use std::path::PathBuf;

use serde_json::json;

use super::attacks::{self, AttackContext, AttackKind, AttackOutcome, AttackSettings};
use super::capability::{self, CapabilityFiles};
use super::geometry::project_2d;
use super::layers::{analyse, Embeddings, LayerFindings};
use super::plots;
use super::probe::ProbeOptions;
use super::prompts::{draw, read_side, DrawSizes, Drawn, BUILTIN_HARMFUL, BUILTIN_HARMLESS};
use super::replies::{coherence, generate_replies, Replies};
use super::report::{
    AnsweredPrompts, AttackResult, AttackRow, Capability, Decoding, Field, Judging,
    LayerProjection, ModelEntry, ModelGeometry, Report, Settings,
};
use super::subject::{Prompting, Subject};
use crate::gpu::Gpu;
use crate::model::{adapter_base_warning, embedded, open_model, LoadOptions, Transformer};
use crate::ops::pool::Pool;
use crate::text::{Message, Tokenizer};
use crate::{Error, Result};

/// The model used when an evaluation names none. One constant, so that switching the default
/// is one line.
pub const DEFAULT_MODEL: &str = embedded::DEFAULT;

/// Everything an evaluation needs to know.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// The evaluated model: a Hugging Face folder or an embedded model's name.
    pub model: String,
    /// A LoRA adapter applied to it (e.g. a `train` output folder).
    pub lora: Option<PathBuf>,
    /// A second model measured beside it, on the same prompts (the model before hardening).
    pub base: Option<String>,
    /// Held-out harmful prompts (`None`: the built-in held-out set).
    pub harmful: Option<PathBuf>,
    /// Held-out harmless prompts (`None`: the built-in held-out set).
    pub harmless: Option<PathBuf>,
    /// How many harmful prompts are answered and embedded for the probes.
    pub harmful_draw: DrawSizes,
    /// How many harmless prompts are answered and embedded for the probes.
    pub harmless_draw: DrawSizes,
    /// The attacks to run, direct inquiry included (`None`: every attack).
    pub attacks: Option<Vec<AttackKind>>,
    /// Budgets and settings of the attacks.
    pub attack_settings: AttackSettings,
    /// Most new tokens of a reply (greedy decoding; a reply also ends at end-of-sequence).
    pub max_new_tokens: usize,
    /// Seed of the prompt draw and of every attack.
    pub seed: u64,
    /// How prompts are rendered (chat template, truncation).
    pub prompting: Prompting,
    /// Where a prompt's embedding is read.
    pub pool: Pool,
    /// The hidden state of the 2-D projection plot (`None`: the middle one).
    pub plot_layer: Option<usize>,
    /// Capability measurements on files.
    pub capability: CapabilityFiles,
    /// Write each model with its refusal direction orthogonalised out of the weights, as
    /// `ablated-<label>/` in `out` (needs the ablation attack).
    pub write_ablated: bool,
    /// The report's folder.
    pub out: PathBuf,
    /// How the models are loaded.
    pub load: LoadOptions,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            model: DEFAULT_MODEL.to_owned(),
            lora: None,
            base: None,
            harmful: None,
            harmless: None,
            harmful_draw: DrawSizes {
                answered: 8,
                probe: 64,
            },
            harmless_draw: DrawSizes {
                answered: 8,
                probe: 64,
            },
            attacks: None,
            attack_settings: AttackSettings::default(),
            max_new_tokens: 256,
            seed: 0,
            prompting: Prompting {
                chat: true,
                max_len: 256,
            },
            pool: Pool::Last,
            plot_layer: None,
            capability: CapabilityFiles::default(),
            write_ablated: false,
            out: PathBuf::from("eval-out"),
            load: LoadOptions::default(),
        }
    }
}

/// Watches an evaluation: stages of work and progress through them.
pub trait EvalObserver {
    /// A stage of `total` units begins (`model`: the column it measures).
    fn stage(&mut self, _model: &str, _what: &str, _total: usize) {}
    /// One unit of the current stage is done.
    fn advance(&mut self) {}
    /// A note for the user (a choice the evaluation made).
    fn note(&mut self, _message: &str) {}
}

/// An observer that shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;

impl EvalObserver for Quiet {}

/// A model and its tokenizer, as opened.
type Opened = (Transformer, Tokenizer);

/// A loaded model and what labels it.
struct Loaded {
    entry: ModelEntry,
    /// Index into the loaded transformers, and whether its adapters run.
    transformer: usize,
    adapters: bool,
}

/// Runs the evaluation of `config` and writes `report.json`, `report.md` and the plots into
/// `config.out`.
pub fn run_eval(gpu: &Gpu, config: &EvalConfig, observer: &mut dyn EvalObserver) -> Result<Report> {
    if config.write_ablated && !selected_attacks(config).contains(&AttackKind::Ablation) {
        return Err(Error::config(
            "write_ablated",
            "writing the ablated models needs the ablation attack among the attacks",
        ));
    }
    let (transformers, columns) = load_models(gpu, config, observer)?;
    let harmful_all = read_side(config.harmful.as_deref(), true)?;
    let harmless_all = read_side(config.harmless.as_deref(), false)?;
    let harmful = draw(
        harmful_all,
        config.harmful_draw,
        config.seed,
        &source_name(&config.harmful, BUILTIN_HARMFUL),
    )?;
    let harmless = draw(
        harmless_all,
        config.harmless_draw,
        config.seed.wrapping_add(1),
        &source_name(&config.harmless, BUILTIN_HARMLESS),
    )?;
    let subject = |c: &Loaded| Subject {
        model: &transformers[c.transformer].0,
        tokenizer: &transformers[c.transformer].1,
        adapters: c.adapters,
        prompting: config.prompting,
    };
    // The reference for KL and coherence: the first column (the base model when given).
    let reference = subject(&columns[0]);
    let mut nu = None;
    let mut measured = Vec::new();
    for column in &columns {
        let label = column.entry.label.as_str();
        let subject = subject(column);
        observer.stage(label, "embeddings", 1);
        let embeddings = Embeddings::measure(gpu, &subject, &harmful, &harmless, config.pool)?;
        observer.advance();
        // Normalised as training normalises: by the base model's harmless norms.
        let nu = nu
            .get_or_insert_with(|| embeddings.harmless_norms())
            .clone();
        let findings = analyse(&embeddings, &nu, &ProbeOptions::default())?;
        let prompts = Prompts::encode(&subject, &harmful, &harmless)?;
        let context = AttackContext {
            gpu,
            subject,
            findings: &findings,
            embeddings: &embeddings,
            harmful: &harmful,
            harmless: &harmless,
            harmful_ids: &prompts.harmful,
            harmless_ids: &prompts.harmless,
            max_new_tokens: config.max_new_tokens,
            seed: config.seed,
            settings: &config.attack_settings,
            source: &column.entry.model,
            ablated_out: config
                .write_ablated
                .then(|| config.out.join(format!("ablated-{label}"))),
        };
        let mut rows = Vec::new();
        let mut harmless_replies = None;
        for kind in selected_attacks(config) {
            let outcomes = if kind == AttackKind::Direct {
                let (outcome, harmless) = direct(&context, label, observer)?;
                harmless_replies = Some(harmless);
                vec![outcome]
            } else {
                attacks::run(kind, &context, label, observer)?
            };
            for outcome in outcomes {
                let coherence = coherence(gpu, &reference, &prompts.harmful, &outcome.replies)?;
                rows.push((
                    outcome.settings.clone(),
                    kind,
                    AttackResult {
                        model: label.to_owned(),
                        dsr: outcome.replies.rates(),
                        coherence: Some(coherence),
                        effort: outcome.effort,
                        replies: outcome.replies.texts,
                    },
                ));
            }
        }
        observer.stage(label, "capability", 1);
        let capability = Capability {
            model: label.to_owned(),
            over_refusal: harmless_replies.as_ref().map(Replies::rates),
            harmless_replies: harmless_replies.map(|r| r.texts).unwrap_or_default(),
            kl_to_base: match columns.len() > 1 && column.entry.label != columns[0].entry.label {
                true => Some(capability::kl_to(
                    gpu,
                    &reference,
                    &subject,
                    &prompts.harmless,
                )?),
                false => None,
            },
            perplexity: capability::perplexity(gpu, &subject, &config.capability)?,
            multiple_choice: capability::multiple_choice(gpu, &subject, &config.capability)?,
        };
        observer.advance();
        let geometry = model_geometry(label, &findings, &embeddings, config)?;
        measured.push((rows, capability, geometry));
    }
    let mut report = assemble(
        config,
        &columns,
        &transformers,
        &harmful,
        &harmless,
        measured,
    );
    std::fs::create_dir_all(&config.out).map_err(|e| Error::io(&config.out, e))?;
    report.plots = plots::write_plots(&report, &config.out)?;
    report.write(&config.out)?;
    Ok(report)
}

/// Each answered prompt's ids under one subject.
struct Prompts {
    harmful: Vec<Vec<u32>>,
    harmless: Vec<Vec<u32>>,
}

impl Prompts {
    fn encode(subject: &Subject, harmful: &Drawn, harmless: &Drawn) -> Result<Prompts> {
        Ok(Prompts {
            harmful: subject.encode_all(&harmful.answered)?,
            harmless: subject.encode_all(&harmless.answered)?,
        })
    }
}

/// Direct inquiry: the plain replies to the harmful prompts, and the rates of the harmless
/// ones (over-refusal).
fn direct(
    context: &AttackContext,
    label: &str,
    observer: &mut dyn EvalObserver,
) -> Result<(AttackOutcome, Replies)> {
    let (gpu, subject) = (context.gpu, &context.subject);
    let total = context.harmful_ids.len() + context.harmless_ids.len();
    observer.stage(label, "direct inquiry", total);
    let mut tick = || observer.advance();
    let harmful = generate_replies(
        gpu,
        subject,
        context.harmful_ids,
        &[],
        context.max_new_tokens,
        &mut tick,
    )?;
    let harmless = generate_replies(
        gpu,
        subject,
        context.harmless_ids,
        &[],
        context.max_new_tokens,
        &mut tick,
    )?;
    let outcome = AttackOutcome {
        settings: Vec::new(),
        replies: harmful,
        effort: Vec::new(),
    };
    Ok((outcome, harmless))
}

fn selected_attacks(config: &EvalConfig) -> Vec<AttackKind> {
    config
        .attacks
        .clone()
        .unwrap_or_else(|| AttackKind::ALL.to_vec())
}

fn source_name(path: &Option<PathBuf>, builtin: &str) -> String {
    path.as_ref()
        .map_or_else(|| builtin.to_owned(), |p| p.display().to_string())
}

/// Opens the evaluated model and the base model. A base that names the same model as a LoRA
/// run shares its weights: the base is the model with its adapters off.
fn load_models(
    gpu: &Gpu,
    config: &EvalConfig,
    observer: &mut dyn EvalObserver,
) -> Result<(Vec<Opened>, Vec<Loaded>)> {
    let mut transformers = Vec::new();
    let (mut model, tokenizer) = open_model(gpu, &config.model, &config.load)?;
    if let Some(dir) = &config.lora {
        if let Some(warning) = adapter_base_warning(dir, &config.model)? {
            observer.note(&warning);
        }
        model.load_adapter(gpu, dir)?;
    }
    transformers.push((model, tokenizer));
    let hardened = ModelEntry {
        label: if config.base.is_some() {
            "hardened"
        } else {
            "model"
        }
        .to_owned(),
        model: config.model.clone(),
        lora: config.lora.as_ref().map(|p| p.display().to_string()),
    };
    let evaluated = Loaded {
        entry: hardened,
        transformer: 0,
        adapters: true,
    };
    let Some(base) = &config.base else {
        return Ok((transformers, vec![evaluated]));
    };
    let shares_weights = *base == config.model;
    let transformer = if shares_weights {
        0
    } else {
        transformers.push(open_model(gpu, base, &config.load)?);
        1
    };
    let (a, b) = (
        &transformers[0].0.config,
        &transformers[transformer].0.config,
    );
    if a.vocab_size != b.vocab_size {
        return Err(Error::InvalidArgument(format!(
            "the base model {base} has a vocabulary of {} tokens and {} has {}: KL and \
             coherence compare the two on the same tokens, so they must share a tokenizer",
            b.vocab_size, config.model, a.vocab_size
        )));
    }
    let base_entry = Loaded {
        entry: ModelEntry {
            label: "base".to_owned(),
            model: base.clone(),
            lora: None,
        },
        transformer,
        adapters: !shares_weights,
    };
    Ok((transformers, vec![base_entry, evaluated]))
}

/// The report's geometry of one model: every layer's row and the 2-D projection.
fn model_geometry(
    label: &str,
    findings: &[LayerFindings],
    embeddings: &Embeddings,
    config: &EvalConfig,
) -> Result<ModelGeometry> {
    let last = findings.len().saturating_sub(1);
    let layer = config.plot_layer.unwrap_or(last.div_ceil(2)).min(last);
    let (harmful, harmless) = embeddings.all(layer);
    Ok(ModelGeometry {
        model: label.to_owned(),
        layers: findings.iter().map(LayerFindings::row).collect(),
        projection: Some(LayerProjection {
            layer,
            projection: project_2d(harmful, harmless)?,
        }),
    })
}

type Measured = (
    Vec<(Vec<Field>, AttackKind, AttackResult)>,
    Capability,
    ModelGeometry,
);

/// The report: rows merged across models by attack and settings, in the order they ran.
fn assemble(
    config: &EvalConfig,
    columns: &[Loaded],
    transformers: &[Opened],
    harmful: &Drawn,
    harmless: &Drawn,
    measured: Vec<Measured>,
) -> Report {
    let mut attacks: Vec<AttackRow> = Vec::new();
    let mut capability = Vec::new();
    let mut geometry = Vec::new();
    for (rows, cap, geo) in measured {
        for (settings, kind, result) in rows {
            let name = kind.name();
            match attacks
                .iter_mut()
                .find(|r| r.attack == name && r.settings == settings)
            {
                Some(row) => row.results.push(result),
                None => attacks.push(AttackRow {
                    attack: name.to_owned(),
                    settings,
                    results: vec![result],
                }),
            }
        }
        capability.push(cap);
        geometry.push(geo);
    }
    Report {
        models: columns.iter().map(|c| c.entry.clone()).collect(),
        settings: settings(config, &transformers[0].1, harmful, harmless),
        judging: Judging::current(),
        answered: AnsweredPrompts {
            harmful: harmful.answered.clone(),
            harmless: harmless.answered.clone(),
        },
        attacks,
        capability,
        geometry,
        plots: Vec::new(),
    }
}

/// How the numbers were made, for the report.
fn settings(
    config: &EvalConfig,
    tokenizer: &Tokenizer,
    harmful: &Drawn,
    harmless: &Drawn,
) -> Settings {
    let chat = config.prompting.chat && tokenizer.has_chat_template();
    let template = if chat {
        tokenizer
            .render_chat(&[Message::user("{prompt}")], true)
            .map_or_else(
                |e| format!("the model's chat template ({e})"),
                |t| format!("the model's chat template: {t:?}"),
            )
    } else {
        "none (plain text)".to_owned()
    };
    let count = |d: &Drawn| {
        json!({
            "answered": d.answered.len(),
            "probe_fit": d.probe_fit.len(),
            "probe_test": d.probe_test.len(),
        })
    };
    let mut other = vec![
        Field::new(
            "harmful prompts",
            source_name(&config.harmful, BUILTIN_HARMFUL),
        ),
        Field::new(
            "harmless prompts",
            source_name(&config.harmless, BUILTIN_HARMLESS),
        ),
        Field::new("harmful drawn", count(harmful)),
        Field::new("harmless drawn", count(harmless)),
        Field::new("pool", format!("{:?}", config.pool).to_lowercase()),
        Field::new("write_ablated", config.write_ablated),
        Field::new("max_len", config.prompting.max_len),
        Field::new(
            "nu",
            "the base model's mean norm of the harmless probe embeddings, per layer (the \
             first column's when no base is given)",
        ),
        Field::new(
            "probe",
            "L2 logistic regression (C = 1) fitted on the probe-fit prompts, accuracy on the \
             probe-test prompts",
        ),
        Field::new(
            "coherence",
            format!(
                "perplexity of the replies under {} given the clean prompt; repetition: share \
                 of repeated word {}-grams",
                "the first column's model",
                super::replies::REPETITION_NGRAM
            ),
        ),
    ];
    other.extend(config.attack_settings.fields());
    Settings {
        template,
        decoding: Decoding::greedy(config.max_new_tokens),
        seeds: vec![
            Field::new("draw (harmful; harmless uses seed + 1)", config.seed),
            Field::new("attacks", config.seed),
        ],
        other,
    }
}
