//! Training tests: one engine step of ES2 and of SFT against PyTorch state files, resume, and
//! short runs of either objective.

mod bad_data;
mod kill;
mod nonfinite;
mod plan;
mod resume;
mod run;
mod sft_run;
mod sft_step;
mod stories;
mod tiny_chat;
mod torch_step;
