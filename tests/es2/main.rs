//! ES2 training tests: one engine step against PyTorch state files, resume, and short runs.

mod bad_data;
mod kill;
mod resume;
mod run;
mod sft_step;
mod stories;
mod tiny_chat;
mod torch_step;
