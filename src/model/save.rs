//! Writing a model out as a Hugging Face folder that transformers loads as it loads the
//! original: `config.json`, `model.safetensors` (f32, with the projection weights in f16 where
//! the model stores them so), and the tokenizer files (copied from the source folder, or
//! generated for an embedded model). The folder is built aside and renamed into place.

use std::path::Path;

use super::embedded;
use super::names::Param;
use super::transformer::Transformer;
use crate::gpu::Gpu;
use crate::io::{atomic_dir, write_json, write_safetensors, SaveTensor};
use crate::{Error, Result};

/// Tokenizer-side files a model folder may carry.
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
];

impl Transformer {
    /// Every base weight with its Hugging Face name (adapters excluded; a tied head is not
    /// repeated).
    pub fn hf_tensors<'a>(&self, gpu: &'a Gpu) -> Vec<(String, SaveTensor<'a>)> {
        let one = |t: &crate::gpu::Tensor| SaveTensor::Device {
            gpu,
            tensor: t.clone(),
        };
        let vocab = |m: &super::VocabMatrix| SaveTensor::Chunks {
            gpu,
            shape: vec![m.rows, m.cols],
            chunks: m.chunks.clone(),
        };
        let name = |param: Param| param.hf_name(self.config.architecture);
        let mut out = vec![(name(Param::Embed), vocab(&self.embed))];
        for (layer, block) in self.blocks.iter().enumerate() {
            out.push((name(Param::AttnNorm(layer)), one(&block.attn_norm)));
            out.push((name(Param::MlpNorm(layer)), one(&block.mlp_norm)));
            for (p, linear) in block.proj.iter() {
                out.push((name(Param::Weight(layer, p)), one(&linear.weight)));
                if let Some(bias) = &linear.bias {
                    out.push((name(Param::Bias(layer, p)), one(bias)));
                }
            }
        }
        out.push((name(Param::FinalNorm), one(&self.final_norm)));
        if let Some(head) = &self.lm_head {
            out.push((name(Param::LmHead), vocab(head)));
        }
        out
    }
}

/// Writes `model` (its base weights: merge adapters first) into `dir` as a Hugging Face
/// folder, with the tokenizer files of `source` (a model folder or an embedded model's name).
pub fn save_pretrained(gpu: &Gpu, model: &Transformer, source: &str, dir: &Path) -> Result<()> {
    if model.has_lora() {
        return Err(Error::InvalidArgument(
            "save_pretrained writes base weights: merge the LoRA adapters first".into(),
        ));
    }
    atomic_dir(dir, |tmp| {
        write_json(&tmp.join("config.json"), &model.config.to_hf_json())?;
        let metadata = [("format".to_owned(), "pt".to_owned())].into();
        write_safetensors(
            &tmp.join("model.safetensors"),
            model.hf_tensors(gpu),
            Some(metadata),
        )?;
        write_tokenizer_files(source, tmp)
    })
}

fn write_tokenizer_files(source: &str, dir: &Path) -> Result<()> {
    let folder = Path::new(source);
    if folder.is_dir() {
        for name in TOKENIZER_FILES {
            let from = folder.join(name);
            if from.exists() {
                let to = dir.join(name);
                std::fs::copy(&from, &to).map_err(|e| Error::io(&to, e))?;
            }
        }
        return Ok(());
    }
    let model = embedded::find(source).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{source}: neither a model folder nor an embedded model"
        ))
    })?;
    model.write_tokenizer_files(dir)
}
