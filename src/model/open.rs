//! Opening a model by what a user names: a Hugging Face model folder, or the name of an
//! embedded model.

use std::path::Path;

use super::config::Config;
use super::embedded::{self, EmbeddedModel};
use super::transformer::{LoadOptions, Transformer};
use super::weights::Checkpoint;
use crate::gpu::Gpu;
use crate::text::Tokenizer;
use crate::{Error, Result};

/// Loads the model and tokenizer named by `spec`: a folder holding `config.json`,
/// `tokenizer.json` and safetensors weights, or the name of an embedded model
/// ([`embedded::names`]). A folder wins over an embedded model of the same name.
pub fn open_model(
    gpu: &Gpu,
    spec: &str,
    options: &LoadOptions,
) -> Result<(Transformer, Tokenizer)> {
    match resolve(spec)? {
        Named::Folder(dir) => open_folder(gpu, dir, options),
        Named::Embedded(model) => open_embedded(gpu, model, options),
    }
}

/// Only the configuration of the model `spec` names (as [`open_model`] resolves it): its
/// `config.json`, with no tokenizer and no weights, so that a run can be planned before the
/// weights are downloaded.
pub fn open_config(spec: &str) -> Result<Config> {
    match resolve(spec)? {
        Named::Folder(dir) => Config::from_file(&dir.join("config.json")),
        Named::Embedded(model) => model.config(),
    }
}

/// What a model name resolves to.
enum Named<'a> {
    Folder(&'a Path),
    Embedded(&'static EmbeddedModel),
}

/// A folder wins over an embedded model of the same name; anything else is an error naming
/// the embedded models.
fn resolve(spec: &str) -> Result<Named<'_>> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(Named::Folder(path));
    }
    if let Some(model) = embedded::find(spec) {
        return Ok(Named::Embedded(model));
    }
    let what = if path.exists() {
        "is not a folder"
    } else {
        "does not exist"
    };
    Err(Error::config(
        "model",
        format!(
            "{spec}: the path {what}, and it is not the name of an embedded model \
             (embedded: {})",
            embedded::names().join(", ")
        ),
    ))
}

/// Loads a Hugging Face model folder. The small files are read first, so that a missing
/// tokenizer is reported before the weights are uploaded.
pub fn open_folder(
    gpu: &Gpu,
    dir: &Path,
    options: &LoadOptions,
) -> Result<(Transformer, Tokenizer)> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(Error::format(
            &config_path,
            "missing: a model folder needs config.json, tokenizer.json and safetensors weights",
        ));
    }
    let config = Config::from_file(&config_path)?;
    let tokenizer = Tokenizer::from_dir(dir, &config.eos_token_ids)?;
    let checkpoint = Checkpoint::open(dir)?.strict(options.strict);
    let model = Transformer::from_source(gpu, config, &checkpoint, options)?;
    Ok((model, tokenizer))
}

/// Opens an embedded model (see [`EmbeddedModel::open`]).
pub fn open_embedded(
    gpu: &Gpu,
    model: &EmbeddedModel,
    options: &LoadOptions,
) -> Result<(Transformer, Tokenizer)> {
    model.open(gpu, options)
}
