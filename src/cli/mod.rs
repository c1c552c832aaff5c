//! The command line's own plumbing: which flags a user gave, and library errors told in terms
//! of flags. Subcommands with enough flags to deserve a file of their own live beside it.

pub mod bench;
pub mod eval;
pub mod train;

use std::collections::BTreeSet;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory};
use es2_wgpu::model::WeightsDtype;
use es2_wgpu::{DeviceFault, Error};

/// How the model's weight matrices are stored on the GPU: `--weights-dtype`, or the older
/// `--f16-weights` it replaces.
#[derive(Args, Debug, Clone)]
pub struct WeightsArgs {
    /// The element type of the frozen weight matrices (block projections, embedding, LM
    /// head) on the GPU: f16 or bf16 takes half their memory (compute stays f32); auto keeps
    /// the 16-bit type config.json declares (f16 or bf16, exactly as stored), else f32. Norms
    /// and biases stay f32.
    #[arg(long, value_enum, default_value_t = WeightsDtype::F32)]
    pub weights_dtype: WeightsDtype,
    /// The same as --weights-dtype f16 (the older flag, kept).
    #[arg(long, conflicts_with = "weights_dtype")]
    pub f16_weights: bool,
}

impl WeightsArgs {
    /// The dtype asked for.
    pub fn dtype(&self) -> WeightsDtype {
        if self.f16_weights {
            WeightsDtype::F16
        } else {
            self.weights_dtype
        }
    }
}

/// The argument ids of the running subcommand that the user set, on the command line or
/// through the environment (not those left at their defaults).
pub fn given_flags(matches: &ArgMatches) -> BTreeSet<String> {
    let Some((_, sub)) = matches.subcommand() else {
        return BTreeSet::new();
    };
    sub.ids()
        .map(|id| id.as_str())
        .filter(|id| {
            matches!(
                sub.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
        .map(str::to_owned)
        .collect()
}

/// The flag that sets configuration field `field` in the running subcommand: the argument
/// whose id (the field name clap derives it from) is the whole path with `_` for `.`
/// (`lora.rank` → `--lora-rank`), or else its last part (`objective.temperature` →
/// `--temperature`).
pub fn flag_for(field: &str, matches: &ArgMatches) -> Option<String> {
    let root = crate::Cli::command();
    let sub = matches
        .subcommand_name()
        .and_then(|name| root.find_subcommand(name));
    let whole = field.replace('.', "_");
    let last = field.rsplit('.').next().unwrap_or(field);
    let flag = sub
        .into_iter()
        .chain([&root])
        .flat_map(|command| command.get_arguments())
        .find(|arg| [whole.as_str(), last].contains(&arg.get_id().as_str()))
        .and_then(|arg| arg.get_long())
        .map(|long| format!("--{long}"));
    flag
}

/// `error` as the command line tells it: configuration fields named by their flags.
pub fn describe(error: &Error, matches: &ArgMatches) -> String {
    match error {
        Error::Config { field, message } => match flag_for(field, matches) {
            Some(flag) => format!("invalid {flag}: {message}"),
            None => error.to_string(),
        },
        Error::RunExists { out, found } => {
            let out = out.display();
            format!(
                "{out} already holds a run ({found}); choose another --out, continue it with \
                 --resume {out}, or pass --overwrite to replace it"
            )
        }
        Error::Device {
            kind: DeviceFault::OutOfMemory | DeviceFault::Validation,
            ..
        } => format!(
            "{error}\nthe work did not fit this GPU: try --recompute, a smaller \
             --harmful-batch/--harmless-batch (--sft-batch under sft) or --max-len, or \
             --f16-weights; `es2-wgpu train --dry-run --gpu-memory SIZE` shows the memory \
             plan, `es2-wgpu info` the adapter's limits"
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(args: &[&str]) -> ArgMatches {
        crate::Cli::command().get_matches_from(args)
    }

    #[test]
    fn every_field_the_library_names_maps_to_a_flag_of_its_command() {
        let cases = [
            (vec!["es2-wgpu", "train"], "steps", "--steps"),
            (
                vec!["es2-wgpu", "train"],
                "harmful_batch",
                "--harmful-batch",
            ),
            (vec!["es2-wgpu", "train"], "max_len", "--max-len"),
            (vec!["es2-wgpu", "train"], "val_fraction", "--val-fraction"),
            (vec!["es2-wgpu", "train"], "task", "--objective"),
            (vec!["es2-wgpu", "train"], "data", "--data"),
            (vec!["es2-wgpu", "train"], "sft_batch", "--sft-batch"),
            (vec!["es2-wgpu", "train"], "model", "--model"),
            (vec!["es2-wgpu", "train"], "objective.layers", "--layers"),
            (
                vec!["es2-wgpu", "train"],
                "objective.temperature",
                "--temperature",
            ),
            (vec!["es2-wgpu", "train"], "objective.lambda", "--lambda"),
            (vec!["es2-wgpu", "train"], "objective.margin", "--margin"),
            (
                vec!["es2-wgpu", "train"],
                "objective.margin_abs",
                "--margin-abs",
            ),
            (vec!["es2-wgpu", "train"], "optimizer.lr", "--lr"),
            (vec!["es2-wgpu", "train"], "optimizer.clip", "--clip"),
            (
                vec!["es2-wgpu", "train"],
                "optimizer.weight_decay",
                "--weight-decay",
            ),
            (vec!["es2-wgpu", "train"], "lora.rank", "--lora-rank"),
            (vec!["es2-wgpu", "train"], "lora.alpha", "--lora-alpha"),
            (vec!["es2-wgpu", "train"], "lora.dropout", "--lora-dropout"),
            (vec!["es2-wgpu", "train"], "lora.targets", "--lora-targets"),
            (vec!["es2-wgpu", "train"], "gpu.backends", "--backend"),
            (vec!["es2-wgpu", "info"], "gpu.adapter", "--adapter"),
            (
                vec!["es2-wgpu", "generate", "--prompt", "x"],
                "sampling.temperature",
                "--temperature",
            ),
            (
                vec!["es2-wgpu", "generate", "--prompt", "x"],
                "sampling.top_p",
                "--top-p",
            ),
            (
                vec!["es2-wgpu", "generate", "--prompt", "x"],
                "sampling.max_tokens",
                "--max-tokens",
            ),
            (
                vec!["es2-wgpu", "embed", "--prompt", "x"],
                "model",
                "--model",
            ),
        ];
        for (args, field, flag) in cases {
            assert_eq!(
                flag_for(field, &matches(&args)).as_deref(),
                Some(flag),
                "{field} in {args:?}"
            );
        }
        // A field with no flag keeps the library's wording.
        let error = Error::config("optimizer.beta1", "must be in [0, 1), got 2");
        let train = matches(&["es2-wgpu", "train"]);
        assert_eq!(describe(&error, &train), error.to_string());
        let error = Error::config("lora.rank", "must be at least 1");
        assert_eq!(
            describe(&error, &train),
            "invalid --lora-rank: must be at least 1"
        );
    }

    #[test]
    fn given_flags_are_those_set_on_the_command_line_or_in_the_environment() {
        let given = given_flags(&matches(&["es2-wgpu", "train", "--steps", "5", "--full"]));
        assert!(
            given.contains("steps") && given.contains("full"),
            "{given:?}"
        );
        assert!(
            !given.contains("lr") && !given.contains("harmful_batch"),
            "{given:?}"
        );
    }
}
