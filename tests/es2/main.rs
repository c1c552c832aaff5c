//! ES2 training tests: one engine step against PyTorch state files, resume, and short runs.

mod torch_step;
