//! `es2-wgpu eval`: flags → `EvalConfig`, a progress bar per stage, and the report's tables.

use std::path::PathBuf;

use clap::Args;
use es2_wgpu::eval::attacks::gcg::GcgSettings;
use es2_wgpu::eval::attacks::{AttackKind, AttackSettings};
use es2_wgpu::eval::capability::CapabilityFiles;
use es2_wgpu::eval::prompts::DrawSizes;
use es2_wgpu::eval::subject::Prompting;
use es2_wgpu::eval::{run_eval, EvalConfig, EvalObserver};
use es2_wgpu::model::LoadOptions;
use es2_wgpu::ops::pool::Pool;
use es2_wgpu::{Gpu, GpuOptions, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// `es2-wgpu eval --help`'s closing example.
pub const EXAMPLE: &str = "Examples:
  es2-wgpu eval
  es2-wgpu train --out es2-out && es2-wgpu eval --lora es2-out --base tiny-chat
  es2-wgpu eval --model models/stories260K --attacks direct,scav,repe --max-new-tokens 64 \\
      --perplexity story.txt --mmlu questions.csv --out stories-eval";

/// The library's defaults, read once for the flags' default values.
fn defaults() -> EvalConfig {
    EvalConfig::default()
}

/// `eval`'s flags. Every default is the library's.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The evaluated model: a Hugging Face folder, or the name of a model built into es2-wgpu.
    #[arg(long, default_value_t = defaults().model)]
    model: String,
    /// A PEFT LoRA adapter applied to --model (e.g. the --out folder of `es2-wgpu train`).
    #[arg(long)]
    lora: Option<PathBuf>,
    /// A second model measured beside it on the same prompts (the model before hardening).
    /// The same name as --model with --lora given: the model with its adapter off.
    #[arg(long)]
    base: Option<String>,
    /// Held-out harmful prompts: JSON array, JSONL or CSV with an
    /// instruction/prompt/goal/behavior/text field (default: the built-in held-out set).
    #[arg(long)]
    harmful: Option<PathBuf>,
    /// Held-out harmless prompts, same formats (default: the built-in held-out set).
    #[arg(long)]
    harmless: Option<PathBuf>,
    /// Attacks to run, comma separated: direct, scav, repe, ablation, soft-prompt, gcg
    /// (default: all).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_attack)]
    attacks: Option<Vec<AttackKind>>,
    /// Output folder: report.json, report.md and the SVG plots.
    #[arg(long, default_value_os_t = defaults().out)]
    out: PathBuf,

    /// Harmful and harmless prompts each model answers, directly and under every attack.
    #[arg(long, default_value_t = defaults().harmful_draw.answered)]
    answered: usize,
    /// Harmful and harmless prompts embedded for the geometry and the probes (half fit the
    /// probes, half test them); disjoint from the answered ones.
    #[arg(long, default_value_t = defaults().harmful_draw.probe)]
    probe_prompts: usize,
    /// Most new tokens of a reply (greedy decoding; a reply also ends at end-of-sequence).
    #[arg(long, default_value_t = defaults().max_new_tokens)]
    max_new_tokens: usize,
    /// Seed of the prompt draw and of every attack.
    #[arg(long, default_value_t = defaults().seed)]
    seed: u64,
    /// Send prompts as plain text instead of through the model's chat template.
    #[arg(long)]
    no_chat: bool,
    /// A longer prompt keeps its last N tokens.
    #[arg(long, default_value_t = defaults().prompting.max_len)]
    max_len: usize,
    /// Where a prompt's embedding is read: its last token, or the mean over its tokens.
    #[arg(long, value_enum, default_value_t = defaults().pool)]
    pool: Pool,
    /// The hidden state of the 2-D projection plot (default: the middle one).
    #[arg(long)]
    plot_layer: Option<usize>,

    /// SCAV's target probabilities P0, comma separated, one report row each.
    #[arg(long, value_name = "LIST", value_delimiter = ',',
          default_values_t = AttackSettings::default().scav.p0)]
    scav_p0: Vec<f64>,
    /// SCAV attacks only hidden states whose probe's held-out accuracy exceeds P1.
    #[arg(long, default_value_t = AttackSettings::default().scav.p1)]
    scav_p1: f64,
    /// RepE's coefficients, comma separated, in units of each hidden state's mean harmless
    /// norm.
    #[arg(long, value_name = "LIST", value_delimiter = ',',
          default_values_t = AttackSettings::default().repe.coefficients)]
    repe_c: Vec<f64>,
    /// Hidden states RepE steers, comma separated (default: the middle half).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    repe_layers: Option<Vec<usize>>,
    /// Also write each model with its refusal direction orthogonalised out of the weights, as
    /// a Hugging Face folder ablated-<label>/ in --out (the weights form of the ablation
    /// attack; adapters merged in).
    #[arg(long)]
    write_ablated: bool,
    /// Free input embeddings of the soft prompt.
    #[arg(long, default_value_t = AttackSettings::default().soft_prompt.tokens)]
    soft_prompt_tokens: usize,
    /// Adam steps of the soft prompt at most, per prompt.
    #[arg(long, default_value_t = AttackSettings::default().soft_prompt.max_steps)]
    soft_prompt_steps: usize,
    #[arg(long, help = gcg_help("GCG's suffix length in tokens", |s| s.suffix_tokens))]
    gcg_suffix: Option<usize>,
    #[arg(long, help = gcg_help("GCG's tokens kept per position", |s| s.top_k))]
    gcg_top_k: Option<usize>,
    #[arg(long, help = gcg_help("GCG's candidate suffixes per step", |s| s.candidates))]
    gcg_candidates: Option<usize>,
    #[arg(long, help = gcg_help("GCG's steps per prompt at most", |s| s.steps))]
    gcg_steps: Option<usize>,
    #[arg(long, help = gcg_help("GCG's candidates scored per pass", |s| s.batch))]
    gcg_batch: Option<usize>,
    /// The reply GCG wants the model to begin with (default: "Sure, here is").
    #[arg(long)]
    gcg_target: Option<String>,
    /// The reply the soft prompt wants the model to begin with.
    #[arg(long, default_value_t = AttackSettings::default().soft_prompt.target)]
    soft_prompt_target: String,

    /// Plain text whose perplexity is measured under each model.
    #[arg(long, value_name = "FILE")]
    perplexity: Option<PathBuf>,
    /// An MMLU-format CSV (question, four choices, answer letter): accuracy by log-likelihood.
    #[arg(long, value_name = "FILE")]
    mmlu: Option<PathBuf>,
    /// Questions of --mmlu used at most (default: all).
    #[arg(long)]
    mmlu_questions: Option<usize>,

    /// The weights' storage.
    #[command(flatten)]
    weights: super::WeightsArgs,
    /// Refuse model weights that hold NaN or infinity (by default they load with a warning).
    #[arg(long)]
    strict: bool,
}

/// A GCG budget flag's help: both default budgets, read from the library.
fn gcg_help(what: &str, value: fn(&GcgSettings) -> usize) -> String {
    format!(
        "{what} (default: {} for models under {}M parameters, else GCG's own {}; once one GCG \
         flag is given, those not given take the small-model values)",
        value(&GcgSettings::small()),
        es2_wgpu::eval::attacks::gcg::SMALL_MODEL_PARAMETERS / 1_000_000,
        value(&GcgSettings::paper())
    )
}

fn parse_attack(name: &str) -> std::result::Result<AttackKind, String> {
    AttackKind::parse(name).map_err(|e| e.to_string())
}

impl EvalArgs {
    /// The library configuration these flags describe.
    fn config(&self) -> EvalConfig {
        let draw = DrawSizes {
            answered: self.answered,
            probe: self.probe_prompts,
        };
        EvalConfig {
            model: self.model.clone(),
            lora: self.lora.clone(),
            base: self.base.clone(),
            harmful: self.harmful.clone(),
            harmless: self.harmless.clone(),
            harmful_draw: draw,
            harmless_draw: draw,
            attacks: self.attacks.clone(),
            attack_settings: self.attack_settings(),
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            prompting: Prompting {
                chat: !self.no_chat,
                max_len: self.max_len,
            },
            pool: self.pool,
            plot_layer: self.plot_layer,
            capability: CapabilityFiles {
                perplexity: self.perplexity.clone(),
                multiple_choice: self.mmlu.clone(),
                questions: self.mmlu_questions,
                ..CapabilityFiles::default()
            },
            write_ablated: self.write_ablated,
            out: self.out.clone(),
            load: LoadOptions {
                weights: self.weights.dtype(),
                strict: self.strict,
                ..LoadOptions::default()
            },
        }
    }

    fn attack_settings(&self) -> AttackSettings {
        let mut settings = AttackSettings::default();
        settings.scav.p0 = self.scav_p0.clone();
        settings.scav.p1 = self.scav_p1;
        settings.repe.coefficients = self.repe_c.clone();
        settings.repe.layers = self.repe_layers.clone();
        settings.soft_prompt.tokens = self.soft_prompt_tokens;
        settings.soft_prompt.max_steps = self.soft_prompt_steps;
        settings.soft_prompt.target = self.soft_prompt_target.clone();
        let gcg_given = [
            self.gcg_suffix,
            self.gcg_top_k,
            self.gcg_candidates,
            self.gcg_steps,
            self.gcg_batch,
        ]
        .iter()
        .any(Option::is_some);
        // With no GCG flag the library sizes GCG's budget to the model; a flag fills the rest
        // of the budget from the small-model one.
        if gcg_given || self.gcg_target.is_some() {
            let small = GcgSettings::small();
            settings.gcg = Some(GcgSettings {
                suffix_tokens: self.gcg_suffix.unwrap_or(small.suffix_tokens),
                top_k: self.gcg_top_k.unwrap_or(small.top_k),
                candidates: self.gcg_candidates.unwrap_or(small.candidates),
                steps: self.gcg_steps.unwrap_or(small.steps),
                batch: self.gcg_batch.unwrap_or(small.batch),
                target: self.gcg_target.clone().unwrap_or(small.target),
            });
        }
        settings
    }
}

/// Progress on stderr: one bar per stage of the evaluation, and a line with each finished
/// stage's time (so that a log shows where the time went).
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Ends the current stage's bar and reports its time.
    fn finish_stage(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            eprintln!(
                "{}: {}/{} in {:.1} s",
                bar.message(),
                bar.position(),
                bar.length().unwrap_or(0),
                bar.elapsed().as_secs_f64()
            );
        }
    }
}

impl EvalObserver for Progress {
    fn stage(&mut self, model: &str, what: &str, total: usize) {
        self.finish_stage();
        let bar = ProgressBar::new(total as u64);
        let style =
            ProgressStyle::with_template("{msg:32} {bar:24} {pos}/{len} [{elapsed_precise}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(format!("{model}: {what}"));
        self.bar = Some(bar);
    }

    fn advance(&mut self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    fn note(&mut self, message: &str) {
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(message),
            _ => eprintln!("{message}"),
        }
    }
}

/// Runs `es2-wgpu eval`: the evaluation with a progress bar, then its tables.
pub fn run(options: &GpuOptions, args: &EvalArgs) -> Result<()> {
    let gpu = Gpu::with_options(options)?;
    let config = args.config();
    let mut progress = Progress { bar: None };
    let started = std::time::Instant::now();
    let report = run_eval(&gpu, &config, &mut progress)?;
    progress.finish_stage();
    print!("{}", report.summary_markdown());
    println!(
        "evaluated in {:.0} s; report.md, report.json and {} plots in {}",
        started.elapsed().as_secs_f64(),
        report.plots.len(),
        config.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        eval: EvalArgs,
    }

    fn config(args: &[&str]) -> EvalConfig {
        let all: Vec<&str> = std::iter::once("eval")
            .chain(args.iter().copied())
            .collect();
        Cli::parse_from(all).eval.config()
    }

    #[test]
    fn no_flags_give_the_library_defaults() {
        let (given, library) = (config(&[]), EvalConfig::default());
        assert_eq!(given.model, library.model);
        assert_eq!(given.harmful_draw, library.harmful_draw);
        assert_eq!(given.harmless_draw, library.harmless_draw);
        assert_eq!(given.attack_settings, library.attack_settings);
        assert_eq!(given.max_new_tokens, library.max_new_tokens);
        assert_eq!(given.prompting, library.prompting);
        assert_eq!(given.out, library.out);
        assert_eq!(given.attacks, None);
    }

    #[test]
    fn flags_reach_the_config() {
        let given = config(&[
            "--attacks",
            "direct,scav,gcg",
            "--scav-p0",
            "0.01,0.1",
            "--repe-c",
            "1,4",
            "--gcg-steps",
            "3",
            "--answered",
            "4",
            "--no-chat",
        ]);
        assert_eq!(
            given.attacks,
            Some(vec![AttackKind::Direct, AttackKind::Scav, AttackKind::Gcg])
        );
        assert_eq!(given.attack_settings.scav.p0, [0.01, 0.1]);
        assert_eq!(given.attack_settings.repe.coefficients, [1.0, 4.0]);
        let gcg = given
            .attack_settings
            .gcg
            .expect("a GCG flag sets its budget");
        assert_eq!((gcg.steps, gcg.top_k), (3, GcgSettings::small().top_k));
        assert_eq!(given.harmless_draw.answered, 4);
        assert!(!given.prompting.chat);
    }

    #[test]
    fn an_unknown_attack_is_refused_with_the_list() {
        let error = Cli::try_parse_from(["eval", "--attacks", "direct,autodan"])
            .err()
            .expect("autodan is not built");
        assert!(error.to_string().contains("soft-prompt"), "{error}");
    }
}
