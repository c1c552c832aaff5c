//! The `es2-wgpu` command line: a thin layer over the library.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use es2_wgpu::gpu::{survey_adapters, AdapterSurvey, GpuOptions};

#[derive(Parser)]
#[command(
    name = "es2-wgpu",
    version,
    about = "Embedding Space Separation safety fine-tuning on any GPU"
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
    #[arg(long, global = true, env = "ES2_ADAPTER")]
    adapter: Option<String>,
    /// Backends to search: vulkan, metal, dx12, gl (comma separated).
    #[arg(long, global = true, env = "ES2_BACKEND")]
    backend: Option<String>,
}

impl GpuArgs {
    fn options(&self) -> GpuOptions {
        GpuOptions {
            adapter: self.adapter.clone(),
            backends: self.backend.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// List every GPU adapter, the one chosen and why, and its limits and features.
    Info {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Info { json } => info(&cli.gpu.options(), *json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn info(options: &GpuOptions, json: bool) -> es2_wgpu::Result<()> {
    let survey = survey_adapters(options)?;
    if json {
        let text = serde_json::to_string_pretty(&survey)
            .map_err(|e| es2_wgpu::Error::InvalidArgument(format!("serialising info: {e}")))?;
        println!("{text}");
    } else {
        print_survey(&survey);
    }
    Ok(())
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
    println!("  subgroups               {:>14}", yes(f.subgroups));
    println!("  timestamp queries       {:>14}", yes(f.timestamp_query));
    println!(
        "  timestamps in passes    {:>14}",
        yes(f.timestamp_query_inside_passes)
    );
}
