//! The README's memory table: the memory plan of an ES2 LoRA run (rank 16 on every projection,
//! batches 8 + 8) on the paper's four chat models (`data/configs/`: only their config.json),
//! at 128 and 256 tokens, with and without activation recomputation, with the frozen weight
//! matrices in f32 and in the checkpoint's own 16-bit type (`--weights-dtype auto`: f16 for
//! Llama-2, bf16 for the others; both take 2 bytes), against discrete GPUs of 16, 24, 48 and
//! 80 GB. No GPU and no weights are needed.
//!
//! ```sh
//! cargo run --example memory_table
//! ```

use es2_wgpu::es2::plan::{DeviceLimits, MemoryPlan};
use es2_wgpu::es2::TrainConfig;
use es2_wgpu::model::{open_config, WeightsDtype};
use es2_wgpu::Result;

const MODELS: [(&str, &str); 4] = [
    ("Llama-2-7B-Chat", "data/configs/llama-2-7b-chat"),
    ("Llama-3-8B-Instruct", "data/configs/llama-3-8b-instruct"),
    (
        "Mistral-7B-Instruct-v0.2",
        "data/configs/mistral-7b-instruct-v0.2",
    ),
    ("Qwen2.5-7B-Instruct", "data/configs/qwen2.5-7b-instruct"),
];
const GPUS_GB: [u64; 4] = [16, 24, 48, 80];
const GIB: f64 = (1u64 << 30) as f64;

/// The total of the run on a GPU of `gb` GiB (the total does not depend on the memory; the
/// limits are a discrete GPU's).
fn plan(
    dir: &str,
    max_len: usize,
    recompute: bool,
    weights_dtype: WeightsDtype,
    gb: u64,
) -> Result<MemoryPlan> {
    let run = TrainConfig {
        model: dir.into(),
        harmful_batch: 8,
        harmless_batch: 8,
        max_len,
        recompute,
        weights_dtype,
        ..TrainConfig::default()
    };
    MemoryPlan::new(
        &open_config(dir)?,
        &run,
        &DeviceLimits::discrete_gpu(gb << 30),
    )
}

fn main() -> Result<()> {
    println!("| model | tokens | recompute | f32 weights | 16-bit weights | 16 GB | 24 GB | 48 GB | 80 GB |");
    println!("|---|---:|---|---:|---:|---|---|---|---|");
    for (name, dir) in MODELS {
        for max_len in [128, 256] {
            for recompute in [false, true] {
                let mut cells = Vec::new();
                let mut totals = [0.0; 2];
                for gb in GPUS_GB {
                    let f32_plan = plan(dir, max_len, recompute, WeightsDtype::F32, gb)?;
                    let half_plan = plan(dir, max_len, recompute, WeightsDtype::Auto, gb)?;
                    totals = [f32_plan.total as f64 / GIB, half_plan.total as f64 / GIB];
                    cells.push(match (f32_plan.fits(), half_plan.fits()) {
                        (true, _) => "fits",
                        (false, true) => "fits with 16-bit",
                        (false, false) => "no",
                    });
                }
                println!(
                    "| {name} | {max_len} | {} | {:.1} GiB | {:.1} GiB | {} |",
                    if recompute { "yes" } else { "no" },
                    totals[0],
                    totals[1],
                    cells.join(" | ")
                );
            }
        }
    }
    Ok(())
}
