//! The `es2-wgpu` command line: a thin layer over the library.

mod cli;

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use es2_wgpu::gpu::{survey_adapters, AdapterSurvey, GpuOptions};
use es2_wgpu::model::{
    adapter_base_warning, embed_prompt, embedded, open_model, Embedding, LoadOptions,
    SamplingOptions,
};
use es2_wgpu::ops::pool::Pool;
use es2_wgpu::text::Tokenizer;
use es2_wgpu::{Error, Gpu, Result};

#[derive(Parser)]
#[command(
    name = "es2-wgpu",
    version,
    about = "Embedding Space Separation safety fine-tuning on any GPU",
    after_help = "With no arguments, `es2-wgpu train` hardens the built-in model on the built-in \
                  prompt sets. `es2-wgpu COMMAND --help` shows each command's options, defaults \
                  and an example."
)]
struct Cli {
    #[command(flatten)]
    gpu: GpuArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct GpuArgs {
    /// Adapter to use: an index from `es2-wgpu info` or a name substring.
    #[arg(long, global = true, env = es2_wgpu::gpu::ADAPTER_ENV)]
    adapter: Option<String>,
    /// Backends to search: vulkan, metal, dx12, gl (comma separated).
    #[arg(long = "backend", value_name = "LIST", global = true, env = es2_wgpu::gpu::BACKEND_ENV)]
    backends: Option<String>,
}

impl GpuArgs {
    fn options(&self) -> GpuOptions {
        GpuOptions {
            adapter: self.adapter.clone(),
            backends: self.backends.clone(),
            ..GpuOptions::default()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// List every GPU adapter, the one chosen and why, and its limits and features.
    #[command(after_help = "Example:\n  ES2_BACKEND=vulkan es2-wgpu info --json")]
    Info {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Continue a prompt, streaming the text as it is made (greedy unless --temperature).
    #[command(
        after_help = "Example:\n  es2-wgpu generate --model models/stories260K \\
                            --prompt \"Once upon a time\" --max-tokens 40"
    )]
    Generate(GenerateArgs),
    /// A prompt's hidden state after the embedding and after every block, pooled over its tokens.
    #[command(
        after_help = "Example:\n  es2-wgpu embed --prompt \"How do I pick a lock?\" \\
                            --chat --pool mean --json"
    )]
    Embed(EmbedArgs),
    /// Write a model as a Hugging Face folder, with a --lora adapter merged into its weights.
    #[command(after_help = "Example:\n  es2-wgpu export --lora es2-out --out tiny-chat-hardened")]
    Export {
        #[command(flatten)]
        model: ModelArgs,
        /// The folder to write (replaced only once the new one is complete).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Harden a model with Embedding Space Separation (no arguments: the built-in model on the
    /// built-in prompt sets), or fine-tune it on conversations (--objective sft --data FILE).
    ///
    /// ES2 (the default objective): LoRA (or full) fine-tuning that pushes the embeddings of
    /// harmful prompts away from those of harmless prompts, while a KL term keeps the model's
    /// next-token distribution on harmless prompts close to the base model's. SFT: next-token
    /// cross-entropy on the assistant turns of each conversation (prompts and padding count
    /// for nothing), rendered with the model's chat template unless --no-chat. Either writes
    /// the adapter (or model/ with --full), metrics.jsonl, curves.svg, checkpoints and
    /// summary.json to --out.
    #[command(after_help = cli::train::EXAMPLE)]
    Train(Box<cli::train::TrainArgs>),
    /// Measure what a defence buys (no arguments: the built-in model): refusals of held-out
    /// harmful prompts, directly and under white-box attacks, over-refusal of harmless ones,
    /// the per-layer geometry of their embeddings, and capability.
    ///
    /// Attacks: SCAV's embedding attack (per-layer probes and their closed-form step, at every
    /// P0), RepE steering (swept in strength), refusal-direction ablation, a soft prompt and
    /// GCG; each is judged by three refusal keyword lists (GCG's is the headline) and the
    /// coherence of its replies. With --base, every number is measured for both models on the
    /// same prompts. Writes report.json, report.md and SVG plots to --out.
    #[command(after_help = cli::eval::EXAMPLE)]
    Eval(Box<cli::eval::EvalArgs>),
    /// Time a workload: a plain language-model step (lm-step, the peers' tiny Llama), an ES2
    /// step (es2-step), or GEMMs (gemm): milliseconds per step, tokens/s, and per kernel family
    /// the GPU time, GFLOP/s and GB/s of one more step (timestamp queries).
    ///
    /// Models are built from a config with seeded weights (--shape), so nothing is downloaded.
    /// The first step builds the pipelines and is reported on its own.
    #[command(after_help = cli::bench::EXAMPLE)]
    Bench(Box<cli::bench::BenchArgs>),
}

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face model folder, or the name of a model built into es2-wgpu.
    #[arg(long, default_value = embedded::DEFAULT)]
    model: String,
    /// A PEFT LoRA adapter folder to apply (e.g. the --out folder of `es2-wgpu train`).
    #[arg(long)]
    lora: Option<std::path::PathBuf>,
    /// The weights' storage (`export` writes f16 matrices as f16, except the projections a
    /// --lora adapter is merged into).
    #[command(flatten)]
    weights: cli::WeightsArgs,
    /// Refuse weights that hold NaN or infinity (by default they load with a warning).
    #[arg(long)]
    strict: bool,
}

impl ModelArgs {
    fn open(&self, gpu: &Gpu) -> Result<(es2_wgpu::model::Transformer, Tokenizer)> {
        let options = LoadOptions {
            weights: self.weights.dtype(),
            strict: self.strict,
            ..LoadOptions::default()
        };
        let (mut model, tokenizer) = open_model(gpu, &self.model, &options)?;
        if let Some(dir) = &self.lora {
            if let Some(warning) = adapter_base_warning(dir, &self.model)? {
                eprintln!("{warning}");
            }
            model.load_adapter(gpu, dir)?;
        }
        Ok((model, tokenizer))
    }
}

#[derive(Args)]
struct PromptArgs {
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Send the prompt as a user message through the model's chat template.
    #[arg(long)]
    chat: bool,
}

impl PromptArgs {
    fn encode(&self, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
        tokenizer.encode_prompt(&self.prompt, self.chat)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Most tokens to generate (generation also stops at an end-of-sequence token).
    #[arg(long, default_value_t = SamplingOptions::default().max_tokens)]
    max_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token every time.
    #[arg(long, default_value_t = SamplingOptions::default().temperature)]
    temperature: f32,
    /// Nucleus sampling: draw from the smallest set of tokens holding this much probability.
    #[arg(long, default_value_t = SamplingOptions::default().top_p)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = SamplingOptions::default().seed)]
    seed: u64,
    /// Print one JSON object {prompt_ids, output_ids, text} instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Which position's hidden state to report: the last token's, or the mean over the prompt.
    #[arg(long, value_enum, default_value_t = Pool::default())]
    pool: Pool,
    /// Also report the next-token logits at the last position.
    #[arg(long)]
    logits: bool,
    /// Print one JSON object {hidden_states, logits} instead of a per-layer summary.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    // First thing, while the process has one thread: see its doc.
    es2_wgpu::gpu::quiet_headless_vulkan();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let gpu = cli.gpu.options();
    let result = match cli.command {
        Command::Info { json } => info(&gpu, json),
        Command::Generate(args) => generate(&gpu, &args),
        Command::Embed(args) => embed(&gpu, &args),
        Command::Train(mut args) => {
            args.given = cli::given_flags(&matches);
            cli::train::run(&gpu, &args)
        }
        Command::Export { model, out } => export(&gpu, &model, &out),
        Command::Eval(args) => cli::eval::run(&gpu, &args),
        Command::Bench(args) => cli::bench::run(&gpu, &args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::describe(&e, &matches));
            ExitCode::FAILURE
        }
    }
}

fn info(options: &GpuOptions, json: bool) -> Result<()> {
    let survey = survey_adapters(options)?;
    if json {
        println!("{}", to_json(&survey, true)?);
    } else {
        print_survey(&survey);
    }
    Ok(())
}

fn to_json(value: &impl serde::Serialize, pretty: bool) -> Result<String> {
    let text = if pretty {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    };
    text.map_err(|e| Error::InvalidArgument(format!("writing JSON: {e}")))
}

fn generate(options: &GpuOptions, args: &GenerateArgs) -> Result<()> {
    let gpu = Gpu::with_options(options)?;
    let (model, tokenizer) = args.model.open(&gpu)?;
    let prompt_ids = args.prompt.encode(&tokenizer)?;
    let sampling = SamplingOptions {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop_ids: tokenizer.eos_ids().to_vec(),
        ..SamplingOptions::default()
    };
    sampling.validate()?;
    // Streamed text holds back bytes that do not yet form a character; with --json the
    // text is decoded once from all the ids, exactly as transformers' `decode` does.
    let mut stream = tokenizer.stream();
    let print = |piece: &str| -> Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(piece.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| Error::io("stdout", e))
    };
    let start = Instant::now();
    let mut first_token = None;
    let output_ids = model.generate(&gpu, &prompt_ids, &sampling, |id| {
        first_token.get_or_insert_with(Instant::now);
        if args.json {
            return Ok(());
        }
        stream.step(id).map_or(Ok(()), |piece| print(&piece))
    })?;
    if args.json {
        let result = serde_json::json!({
            "prompt_ids": prompt_ids,
            "output_ids": output_ids,
            "text": tokenizer.decode(&output_ids)?,
        });
        println!("{}", to_json(&result, false)?);
    } else {
        print(&stream.finish())?;
        println!();
        report_speed(prompt_ids.len(), output_ids.len(), start, first_token);
    }
    Ok(())
}

/// Tokens per second on stderr: the prompt's pass up to the first token, then decoding.
fn report_speed(prompt: usize, generated: usize, start: Instant, first: Option<Instant>) {
    let Some(first) = first else { return };
    let to_first = first.duration_since(start).as_secs_f64();
    let decoding = first.elapsed().as_secs_f64();
    let rate = if generated > 1 && decoding > 0.0 {
        format!("{:.1} tokens/s", (generated - 1) as f64 / decoding)
    } else {
        "n/a".into()
    };
    eprintln!(
        "{generated} tokens; first after {:.0} ms ({prompt}-token prompt), then {rate}",
        to_first * 1e3
    );
}

fn export(options: &GpuOptions, args: &ModelArgs, out: &std::path::Path) -> Result<()> {
    let gpu = Gpu::with_options(options)?;
    let (mut model, _) = args.open(&gpu)?;
    if model.has_lora() {
        model.merge_lora(&gpu)?;
    }
    es2_wgpu::model::save_pretrained(&gpu, &model, &args.model, out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn embed(options: &GpuOptions, args: &EmbedArgs) -> Result<()> {
    let gpu = Gpu::with_options(options)?;
    let (model, tokenizer) = args.model.open(&gpu)?;
    let ids = args.prompt.encode(&tokenizer)?;
    let embedding = embed_prompt(&gpu, &model, &ids, args.pool, args.logits)?;
    if args.json {
        println!("{}", to_json(&embedding, false)?);
    } else {
        print_embedding(&embedding, &tokenizer, ids.len(), args.pool);
    }
    Ok(())
}

fn print_embedding(e: &Embedding, tokenizer: &Tokenizer, tokens: usize, pool: Pool) {
    let at = match pool {
        Pool::Last => "the last token",
        Pool::Mean => "the mean over the tokens",
    };
    println!("hidden states of a {tokens}-token prompt at {at}:");
    let last = e.hidden_states.len() - 1;
    for (i, h) in e.hidden_states.iter().enumerate() {
        let what = match i {
            0 => "embedding".to_string(),
            i if i == last => "final norm".to_string(),
            i => format!("block {}", i - 1),
        };
        println!(
            "  [{i:>2}] {what:<10} norm {:>9.4}  {}",
            norm(h),
            preview(h)
        );
    }
    if let Some(logits) = &e.logits {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        println!("logits at the last token: norm {:.4}; top 5:", norm(logits));
        for &id in order.iter().take(5) {
            let text = tokenizer.decode(&[id as u32]).unwrap_or_default();
            println!("  {id:>7} {:>10.4}  {text:?}", logits[id]);
        }
    }
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// The first few values of a vector.
fn preview(v: &[f32]) -> String {
    let shown: Vec<String> = v.iter().take(4).map(|x| format!("{x:+.4}")).collect();
    format!("[{}, ...]", shown.join(", "))
}

fn print_survey(survey: &AdapterSurvey) {
    for a in &survey.adapters {
        let mark = if a.index == survey.chosen { "*" } else { " " };
        println!(
            "{mark} [{}] {} ({}, {}, driver: {} {})",
            a.index, a.name, a.backend, a.device_type, a.driver, a.driver_info
        );
    }
    let Some(chosen) = survey.adapters.get(survey.chosen) else {
        return;
    };
    println!(
        "\nchosen: [{}] {}: {}",
        chosen.index, chosen.name, survey.reason
    );
    let l = &chosen.limits;
    println!("limits:");
    println!(
        "  max storage binding     {:>14} bytes ({} MiB)",
        l.max_storage_buffer_binding_size,
        l.max_storage_buffer_binding_size >> 20
    );
    println!(
        "  max buffer              {:>14} bytes ({} MiB)",
        l.max_buffer_size,
        l.max_buffer_size >> 20
    );
    println!(
        "  workgroup storage       {:>14} bytes",
        l.max_compute_workgroup_storage_size
    );
    println!(
        "  invocations / workgroup {:>14}",
        l.max_compute_invocations_per_workgroup
    );
    println!(
        "  workgroups / dimension  {:>14}",
        l.max_compute_workgroups_per_dimension
    );
    println!(
        "  storage buffers / stage {:>14}",
        l.max_storage_buffers_per_shader_stage
    );
    let f = &chosen.features;
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!("features:");
    println!("  shader-f16              {:>14}", yes(f.shader_f16));
    let subgroups = match (f.subgroups, f.subgroup_sizes) {
        (false, _) => "no".to_string(),
        (true, [min, max]) if min == max => format!("yes, {min} lanes"),
        (true, [min, max]) => format!("yes, {min}-{max} lanes"),
    };
    println!("  subgroups               {subgroups:>14}");
    println!("  timestamp queries       {:>14}", yes(f.timestamp_query));
    println!(
        "  timestamps in passes    {:>14}",
        yes(f.timestamp_query_inside_passes)
    );
    println!("  pipeline cache          {:>14}", yes(f.pipeline_cache));
}
