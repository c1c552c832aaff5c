//! Subcommands with enough flags to deserve a file of their own.

pub mod train;
