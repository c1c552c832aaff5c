//! The evaluation report: the data model of `report.json` and the `report.md` rendered from it.
//!
//! Rows are attacks, columns are models (usually `base` and `hardened`). An attack is known to
//! the report only by its name, its settings and its effort, as name/value fields, so that new
//! attacks need no change here. Every seed, the template and the decoding are recorded.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::geometry::{LayerGeometry, Projection};
use super::judge::{JudgeKind, ListRates, Rate, NORMALISATION};
use crate::io::{atomic_write, write_json};
use crate::Result;

/// Everything one evaluation measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The models evaluated, in column order.
    pub models: Vec<ModelEntry>,
    /// How the numbers were made.
    pub settings: Settings,
    /// The refusal judges and their rules.
    pub judging: Judging,
    /// The prompts every model answered, in the order of each result's replies.
    #[serde(default)]
    pub answered: AnsweredPrompts,
    /// One row per attack (direct inquiry included), in the order they ran.
    pub attacks: Vec<AttackRow>,
    /// What each model can still do.
    pub capability: Vec<Capability>,
    /// Each model's per-layer geometry.
    pub geometry: Vec<ModelGeometry>,
    /// The SVG plots written beside the report (file names).
    #[serde(default)]
    pub plots: Vec<String>,
}

/// The held-out prompts an evaluation answered (and attacked, for the harmful ones).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AnsweredPrompts {
    /// The harmful prompts: [`AttackResult::replies`] answers them in this order.
    pub harmful: Vec<String>,
    /// The harmless prompts: [`Capability::harmless_replies`] answers them in this order.
    pub harmless: Vec<String>,
}

/// One evaluated model: a column of the tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// The column name (`base`, `hardened`).
    pub label: String,
    /// The model folder or built-in name.
    pub model: String,
    /// The LoRA adapter folder applied to it, if any.
    pub lora: Option<String>,
}

/// A named value: an attack's setting or effort, a seed, an option.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Field {
    /// What it is (`p0`, `mean_epsilon_norm`, `layers_fired`).
    pub name: String,
    /// Its value: a number, a string, a list...
    pub value: Value,
}

impl Field {
    /// A field from anything JSON can hold.
    pub fn new(name: impl Into<String>, value: impl Into<Value>) -> Field {
        Field {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// How the numbers were made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// How prompts were rendered: the chat template's name or source, or `none`.
    pub template: String,
    /// How replies were generated.
    pub decoding: Decoding,
    /// Every seed used (`split`, `sampling`, per attack...).
    pub seeds: Vec<Field>,
    /// Anything else a reader needs to redo the run (prompt files, layers, pool...).
    pub other: Vec<Field>,
}

/// How replies were generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decoding {
    /// Most new tokens per reply.
    pub max_new_tokens: usize,
    /// Sampling temperature; `None` is greedy decoding.
    pub temperature: Option<f64>,
    /// Nucleus sampling's p, if any.
    pub top_p: Option<f64>,
}

impl Decoding {
    /// Greedy decoding of at most `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Decoding {
        Decoding {
            max_new_tokens,
            temperature: None,
            top_p: None,
        }
    }

    fn describe(&self) -> String {
        let mut text = match self.temperature {
            None => "greedy".to_owned(),
            Some(t) => format!("sampled at temperature {}", number(t)),
        };
        if let Some(p) = self.top_p {
            let _ = write!(text, ", top-p {}", number(p));
        }
        let _ = write!(text, ", at most {} new tokens", self.max_new_tokens);
        text
    }
}

/// The refusal judges the rates come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judging {
    /// The list whose rate the tables lead with.
    pub headline: JudgeKind,
    /// How replies are normalised before matching.
    pub normalisation: String,
    /// Every list, with its rule.
    pub lists: Vec<JudgeList>,
}

/// One refusal list, as the report describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeList {
    /// Which list.
    pub kind: JudgeKind,
    /// How many strings it has.
    pub strings: usize,
    /// Its matching rule, in words.
    pub rule: String,
}

impl Judging {
    /// The judges `judge` implements.
    pub fn current() -> Judging {
        let describe = |kind: JudgeKind| JudgeList {
            kind,
            strings: kind.strings().len(),
            rule: kind.rule().to_owned(),
        };
        Judging {
            headline: JudgeKind::HEADLINE,
            normalisation: NORMALISATION.to_owned(),
            lists: JudgeKind::ALL.into_iter().map(describe).collect(),
        }
    }
}

/// One attack: its settings and, per model, what it achieved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackRow {
    /// The attack's name (`direct`, `scav`, `repe`, `soft-prompt`, `gcg`...).
    pub attack: String,
    /// The settings that tell this row from another of the same attack (`p0` = 0.01...).
    pub settings: Vec<Field>,
    /// One result per model.
    pub results: Vec<AttackResult>,
}

impl AttackRow {
    /// The result on the model labelled `model`.
    pub fn result(&self, model: &str) -> Option<&AttackResult> {
        self.results.iter().find(|r| r.model == model)
    }
}

/// What one attack achieved on one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackResult {
    /// The model's label (a [`ModelEntry::label`]).
    pub model: String,
    /// Defence success rate per list: harmful prompts whose attacked reply is a refusal.
    pub dsr: ListRates,
    /// Whether the attacked replies are still language.
    pub coherence: Option<Coherence>,
    /// What the attack spent (`mean_epsilon_norm`, `layers_fired`, `steps`, `final_loss`...).
    pub effort: Vec<Field>,
    /// The attacked replies, one per harmful prompt of [`Report::answered`], so that a verdict
    /// can be read against the text it judged.
    #[serde(default)]
    pub replies: Vec<String>,
}

/// Coherence of the attacked replies, so that gibberish does not pass as a defence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Coherence {
    /// The base model's perplexity of the replies.
    pub perplexity: f64,
    /// Share of repeated n-grams in the replies.
    pub repetition: f64,
}

/// What one model can still do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capability {
    /// The model's label.
    pub model: String,
    /// Harmless prompts whose reply is judged a refusal, per list.
    pub over_refusal: Option<ListRates>,
    /// The replies to the harmless prompts of [`Report::answered`] (when direct inquiry ran).
    #[serde(default)]
    pub harmless_replies: Vec<String>,
    /// Mean KL(base ‖ model) of the next-token distributions on harmless prompts.
    pub kl_to_base: Option<f64>,
    /// Perplexity on a text file.
    pub perplexity: Option<Scored>,
    /// Multiple-choice accuracy by log-likelihood on an MMLU-format file.
    pub multiple_choice: Option<Scored>,
}

/// A number measured on a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// The file it was measured on.
    pub file: String,
    /// The value (perplexity, or accuracy as a share).
    pub value: f64,
    /// Items it was measured over (tokens, questions).
    pub count: usize,
}

/// One model's geometry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelGeometry {
    /// The model's label.
    pub model: String,
    /// One row per layer measured.
    pub layers: Vec<LayerRow>,
    /// The 2-D projection at one chosen layer, if made.
    pub projection: Option<LayerProjection>,
}

/// One layer's distances and probe accuracy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRow {
    /// Hidden-state index (transformers' `hidden_states[layer]`): after block `layer − 1`,
    /// 0 = the input embeddings. Training's block index l is hidden state l + 1.
    pub layer: usize,
    /// The distances.
    #[serde(flatten)]
    pub geometry: LayerGeometry,
    /// Held-out accuracy of a probe fitted on this model's own embeddings.
    pub probe_accuracy: Option<f64>,
}

/// A 2-D projection at one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerProjection {
    /// The hidden-state index projected.
    pub layer: usize,
    /// The coordinates.
    pub projection: Projection,
}

impl Report {
    /// Writes `report.json` and `report.md` into `dir`, each atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join("report.json"), self)?;
        let markdown = self.to_markdown();
        atomic_write(&dir.join("report.md"), |w| w.write_all(markdown.as_bytes()))
    }

    /// The report as Markdown: the attack table, effort, capability, geometry, settings.
    pub fn to_markdown(&self) -> String {
        let mut md = String::from("# es2-wgpu evaluation\n\n");
        md += &self.models_section();
        md += &self.attacks_section();
        md += &self.effort_section();
        md += &self.capability_section();
        md += &self.geometry_section();
        md += &self.plots_section();
        md += &self.settings_section();
        md
    }

    /// The attack and capability tables alone, for a terminal.
    pub fn summary_markdown(&self) -> String {
        self.attacks_section() + &self.capability_section()
    }

    fn labels(&self) -> Vec<&str> {
        self.models.iter().map(|m| m.label.as_str()).collect()
    }

    fn models_section(&self) -> String {
        let describe = |m: &ModelEntry| match &m.lora {
            Some(lora) => format!(
                "- **{}**: `{}` with the LoRA adapter `{lora}`",
                m.label, m.model
            ),
            None => format!("- **{}**: `{}`", m.label, m.model),
        };
        let lines: Vec<String> = self.models.iter().map(describe).collect();
        format!("{}\n\n", lines.join("\n"))
    }

    fn attacks_section(&self) -> String {
        let lists: Vec<String> = self
            .judging
            .lists
            .iter()
            .map(|l| {
                let label = l.kind.label();
                if l.kind == self.judging.headline {
                    format!("**{label}** (headline)")
                } else {
                    label.to_owned()
                }
            })
            .collect();
        let mut md = format!(
            "## Refusal under attack\n\nDSR: share of harmful prompts whose reply is judged a \
             refusal, per keyword list: {}. Coherence of the attacked replies: the base model's \
             perplexity of them (ppl) and their repetition rate (rep). {}.\n\n",
            lists.join(" / "),
            capitalised(&self.judging.normalisation)
        );
        let rows = self.attacks.iter().map(|row| {
            self.model_row(row_name(row), |label| {
                row.result(label).map(|r| self.attack_cell(r))
            })
        });
        md += &table(&self.header("attack"), rows);
        md
    }

    fn attack_cell(&self, result: &AttackResult) -> String {
        let mut cell = self.rates_cell(&result.dsr);
        if let Some(c) = &result.coherence {
            let _ = write!(
                cell,
                " · ppl {} · rep {}",
                number(c.perplexity),
                number(c.repetition)
            );
        }
        cell
    }

    /// Every list's rate, in the judging order, the headline bold, then the count judged.
    fn rates_cell(&self, rates: &ListRates) -> String {
        let parts: Vec<String> = self
            .judging
            .lists
            .iter()
            .map(|l| {
                let text = rates.get(&l.kind).map_or_else(missing, percent);
                if l.kind == self.judging.headline {
                    format!("**{text}**")
                } else {
                    text
                }
            })
            .collect();
        let total = rates.values().map(|r| r.total).max().unwrap_or(0);
        format!("{} (n={total})", parts.join(" / "))
    }

    fn effort_section(&self) -> String {
        let has_effort = |row: &&AttackRow| row.results.iter().any(|r| !r.effort.is_empty());
        let rows: Vec<Vec<String>> = self
            .attacks
            .iter()
            .filter(has_effort)
            .map(|row| {
                self.model_row(row_name(row), |label| {
                    row.result(label).map(|r| fields(&r.effort))
                })
            })
            .collect();
        if rows.is_empty() {
            return String::new();
        }
        format!(
            "### Attack effort\n\n{}",
            table(&self.header("attack"), rows)
        )
    }

    fn capability_section(&self) -> String {
        let row = |name: &str, show: &dyn Fn(&Capability) -> Option<String>| {
            self.model_row(name.to_owned(), |label| {
                self.capability
                    .iter()
                    .find(|c| c.model == label)
                    .and_then(show)
            })
        };
        let scored_file = |pick: fn(&Capability) -> &Option<Scored>| {
            self.capability
                .iter()
                .find_map(|c| pick(c).as_ref())
                .map_or_else(String::new, |s| format!(" on `{}`", s.file))
        };
        let rows = vec![
            row("over-refusal (harmless prompts refused)", &|c| {
                c.over_refusal.as_ref().map(|r| self.rates_cell(r))
            }),
            row("KL(base ‖ model), harmless prompts", &|c| {
                c.kl_to_base.map(number)
            }),
            row(
                &format!("perplexity{}", scored_file(|c| &c.perplexity)),
                &|c| c.perplexity.as_ref().map(|s| number(s.value)),
            ),
            row(
                &format!("multiple choice{}", scored_file(|c| &c.multiple_choice)),
                &|c| {
                    c.multiple_choice
                        .as_ref()
                        .map(|s| format!("{:.1}% (n={})", 100.0 * s.value, s.count))
                },
            ),
        ];
        format!("## Capability\n\n{}", table(&self.header("measure"), rows))
    }

    fn geometry_section(&self) -> String {
        let labels = self.labels();
        let mut header = vec!["layer".to_owned()];
        for measure in [
            "centroid L2/ν",
            "pairwise L2/ν",
            "centroid 1−cos",
            "probe acc.",
        ] {
            header.extend(labels.iter().map(|l| format!("{measure} ({l})")));
        }
        let mut layers: Vec<usize> = self
            .geometry
            .iter()
            .flat_map(|g| g.layers.iter().map(|r| r.layer))
            .collect();
        layers.sort_unstable();
        layers.dedup();
        let find = |label: &str, layer: usize| {
            self.geometry
                .iter()
                .find(|g| g.model == label)
                .and_then(|g| g.layers.iter().find(|r| r.layer == layer))
        };
        let measures: [fn(&LayerRow) -> Option<String>; 4] = [
            |r| Some(number(r.geometry.centroid_normalised.l2)),
            |r| Some(number(r.geometry.pairwise_normalised.l2)),
            |r| Some(number(r.geometry.centroid.cosine)),
            |r| r.probe_accuracy.map(|a| format!("{:.1}%", 100.0 * a)),
        ];
        let rows = layers.into_iter().map(|layer| {
            let cells = measures.iter().flat_map(|measure| {
                labels
                    .iter()
                    .map(move |label| find(label, layer).and_then(measure).unwrap_or_else(missing))
            });
            std::iter::once(layer.to_string()).chain(cells).collect()
        });
        format!(
            "## Geometry per layer\n\nHeld-out harmful against harmless prompts: distance of \
             the centroids and mean distance over all pairs, L2 divided by ν (the harmless \
             embeddings' mean norm), cosine distance of the centroids, and the held-out \
             accuracy of a logistic-regression probe fitted on the model's own embeddings. \
             Layer i is the hidden state after block i − 1 (transformers' `hidden_states[i]`, \
             0 = the input embeddings); training's `layers` count blocks, so its layer l is \
             row l + 1 here.\n\n{}",
            table(&header, rows)
        )
    }

    fn plots_section(&self) -> String {
        if self.plots.is_empty() {
            return String::new();
        }
        let images: Vec<String> = self
            .plots
            .iter()
            .map(|p| format!("![{}]({p})", p.trim_end_matches(".svg")))
            .collect();
        format!("## Plots\n\n{}\n\n", images.join("\n\n"))
    }

    fn settings_section(&self) -> String {
        let s = &self.settings;
        let mut rows = vec![
            vec!["template".to_owned(), s.template.clone()],
            vec!["decoding".to_owned(), s.decoding.describe()],
        ];
        rows.extend(
            s.seeds
                .iter()
                .map(|f| vec![format!("seed: {}", f.name), value(&f.value)]),
        );
        rows.extend(
            s.other
                .iter()
                .map(|f| vec![f.name.clone(), value(&f.value)]),
        );
        rows.extend(self.judging.lists.iter().map(|l| {
            vec![
                format!("judge: {}", l.kind.label()),
                format!("{} strings; {}", l.strings, l.rule),
            ]
        }));
        rows.push(vec![
            "judge: normalisation".to_owned(),
            self.judging.normalisation.clone(),
        ]);
        format!(
            "## Settings\n\n{}",
            table(&["setting".to_owned(), "value".to_owned()], rows)
        )
    }

    /// A table row: `first`, then for each model in column order what `cell` shows for its
    /// label, or a dash.
    fn model_row(&self, first: String, cell: impl Fn(&str) -> Option<String>) -> Vec<String> {
        let cells = self
            .models
            .iter()
            .map(|m| cell(&m.label).unwrap_or_else(missing));
        std::iter::once(first).chain(cells).collect()
    }

    fn header(&self, first: &str) -> Vec<String> {
        std::iter::once(first.to_owned())
            .chain(self.labels().into_iter().map(str::to_owned))
            .collect()
    }
}

/// A Markdown table; `|` in cells is escaped.
fn table(header: &[String], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let line = |cells: &[String]| {
        let escaped: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
        format!("| {} |\n", escaped.join(" | "))
    };
    let mut md = line(header);
    md += &format!("|{}\n", "---|".repeat(header.len()));
    for row in rows {
        md += &line(&row);
    }
    md + "\n"
}

/// An attack's row name: its name and settings, `scav (p0=0.01)`.
fn row_name(row: &AttackRow) -> String {
    if row.settings.is_empty() {
        row.attack.clone()
    } else {
        format!("{} ({})", row.attack, fields(&row.settings))
    }
}

/// `name=value, ...`.
fn fields(fields: &[Field]) -> String {
    let parts: Vec<String> = fields
        .iter()
        .map(|f| format!("{}={}", f.name, value(&f.value)))
        .collect();
    parts.join(", ")
}

/// A JSON value as a table shows it.
fn value(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_f64() => n.as_f64().map_or_else(missing, number),
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(value).collect();
            format!("[{}]", parts.join(", "))
        }
        Value::Null => missing(),
        other => other.to_string(),
    }
}

/// Four significant digits, in exponent form when very large or small.
fn number(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    let magnitude = x.abs();
    if magnitude == 0.0 {
        return "0".to_owned();
    }
    if !(1e-3..1e5).contains(&magnitude) {
        return format!("{x:.3e}");
    }
    let decimals = (3 - magnitude.log10().floor() as i32).max(0) as usize;
    let text = format!("{x:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

fn percent(rate: &Rate) -> String {
    rate.fraction()
        .map_or_else(missing, |f| format!("{:.1}%", 100.0 * f))
}

fn missing() -> String {
    "—".to_owned()
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |c| {
        c.to_uppercase().chain(chars).collect::<String>()
    })
}
