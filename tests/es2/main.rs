//! ES2 training tests: one engine step against PyTorch state files, resume, and short runs.

mod bad_data;
mod kill;
mod nonfinite;
mod plan;
mod resume;
mod run;
mod sft_step;
mod stories;
mod torch_step;
