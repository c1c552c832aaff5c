//! Writing a model out as a Hugging Face folder that transformers loads as it loads the
//! original: `config.json`, `model.safetensors` (f32, with the weight matrices in f16 or bf16
//! where the model stores them so), and the tokenizer files (copied from the source folder, or
//! generated for an embedded model). The folder is built aside and renamed into place.

use std::path::Path;

use super::embedded;
use super::linear::Linear;
use super::names::{Param, Projection};
use super::transformer::Transformer;
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::io::{atomic_dir, write_json, write_safetensors, SaveTensor};
use crate::ops::cast::cast;
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
    write_folder(model, model.hf_tensors(gpu), source, dir)
}

/// Writes `model` into `dir` as [`save_pretrained`] does, its adapters merged in (when
/// `adapters`) and `direction` projected out of every weight that writes into the residual
/// stream: the token embedding and each block's attention-output and MLP-down projections,
/// biases included (Arditi et al.'s weight orthogonalisation, the weights form of ablating a
/// refusal direction). The changed weights are computed on the host and written in f32; the
/// model on the GPU is left as it is, so a base model that shares its weights stays intact.
/// A tied LM head shares the embedding, and so loses the direction too.
pub fn save_orthogonalised(
    gpu: &Gpu,
    model: &Transformer,
    adapters: bool,
    direction: &[f64],
    source: &str,
    dir: &Path,
) -> Result<()> {
    let unit = unit_vector(direction, model.config.hidden_size)?;
    let embed = model.embed.to_f32(gpu)?;
    let mut tensors = vec![(
        Param::Embed.hf_name(model.config.architecture),
        SaveTensor::Host {
            shape: vec![model.embed.rows, model.embed.cols],
            data: project_out_of_rows(embed, &unit),
        },
    )];
    for (layer, block) in model.blocks.iter().enumerate() {
        for (p, linear) in block.proj.iter() {
            let writes = matches!(p, Projection::O | Projection::Down);
            let merge = adapters && linear.lora.is_some();
            tensors.extend(projection_tensors(
                gpu,
                model,
                layer,
                p,
                linear,
                merge,
                writes.then_some(&unit[..]),
            )?);
        }
    }
    for (name, tensor) in model.hf_tensors(gpu) {
        if !tensors.iter().any(|(n, _)| *n == name) {
            tensors.push((name, tensor));
        }
    }
    write_folder(model, tensors, source, dir)
}

/// `direction` scaled to unit length; an error unless it is `width` finite values, not all 0.
fn unit_vector(direction: &[f64], width: usize) -> Result<Vec<f64>> {
    let norm = direction.iter().map(|x| x * x).sum::<f64>().sqrt();
    if direction.len() != width || !norm.is_finite() || norm == 0.0 {
        return Err(Error::InvalidArgument(format!(
            "a direction to project out needs {width} finite values, not all zero (got {} \
             values of norm {norm})",
            direction.len()
        )));
    }
    Ok(direction.iter().map(|x| x / norm).collect())
}

/// Rows of width `r.len()` with their component along the unit `r` removed: x − (x·r) r.
fn project_out_of_rows(mut rows: Vec<f32>, r: &[f64]) -> Vec<f32> {
    for row in rows.chunks_exact_mut(r.len()) {
        let along: f64 = row.iter().zip(r).map(|(&x, &u)| f64::from(x) * u).sum();
        for (x, &u) in row.iter_mut().zip(r) {
            *x = (f64::from(*x) - along * u) as f32;
        }
    }
    rows
}

/// `W [out, in]` with the unit `r [out]` projected out of its columns: W − r (rᵀ W).
fn project_out_of_columns(w: &mut [f32], r: &[f64]) {
    let cols = w.len() / r.len();
    let mut along = vec![0.0f64; cols];
    for (row, &u) in w.chunks_exact(cols).zip(r) {
        for (a, &x) in along.iter_mut().zip(row) {
            *a += u * f64::from(x);
        }
    }
    for (row, &u) in w.chunks_exact_mut(cols).zip(r) {
        for (x, &a) in row.iter_mut().zip(&along) {
            *x = (f64::from(*x) - u * a) as f32;
        }
    }
}

/// One projection's weight (and bias) on the host, its adapter merged in when `merge` and the
/// direction `r` projected out of its outputs when given; nothing when neither applies (the
/// device copy is written as it is).
fn projection_tensors<'a>(
    gpu: &Gpu,
    model: &Transformer,
    layer: usize,
    p: Projection,
    linear: &Linear,
    merge: bool,
    r: Option<&[f64]>,
) -> Result<Vec<(String, SaveTensor<'a>)>> {
    if !merge && r.is_none() {
        return Ok(Vec::new());
    }
    let (out, inp) = (linear.out_features(), linear.in_features());
    let mut w = widened(gpu, &linear.weight)?;
    if let (true, Some(lora)) = (merge, &linear.lora) {
        let (a, b, rank) = (lora.a.to_f32(gpu)?, lora.b.to_f32(gpu)?, lora.rank());
        for (o, row) in w.chunks_exact_mut(inp).enumerate() {
            for k in 0..rank {
                let scale = lora.scale * b[o * rank + k];
                for (x, &av) in row.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                    *x += scale * av;
                }
            }
        }
    }
    let mut bias = linear.bias.as_ref().map(|b| b.to_f32(gpu)).transpose()?;
    if let Some(r) = r {
        project_out_of_columns(&mut w, r);
        if let Some(b) = &mut bias {
            *b = project_out_of_rows(std::mem::take(b), r);
        }
    }
    let arch = model.config.architecture;
    let mut tensors = vec![(
        Param::Weight(layer, p).hf_name(arch),
        SaveTensor::Host {
            shape: vec![out, inp],
            data: w,
        },
    )];
    if let Some(data) = bias {
        tensors.push((
            Param::Bias(layer, p).hf_name(arch),
            SaveTensor::Host {
                shape: vec![out],
                data,
            },
        ));
    }
    Ok(tensors)
}

/// A weight's values as f32 on the host, whatever its storage type.
fn widened(gpu: &Gpu, weight: &Tensor) -> Result<Vec<f32>> {
    if weight.dtype() == DType::F32 {
        return weight.to_f32(gpu);
    }
    let wide = Tensor::empty(gpu, weight.shape().clone(), DType::F32);
    let mut rec = Recorder::new(gpu);
    cast(&mut rec, weight, &wide);
    rec.finish()?;
    wide.to_f32(gpu)
}

/// `config.json`, `model.safetensors` of `tensors`, and the tokenizer files of `source`, built
/// aside and renamed into `dir`.
fn write_folder(
    model: &Transformer,
    tensors: Vec<(String, SaveTensor)>,
    source: &str,
    dir: &Path,
) -> Result<()> {
    atomic_dir(dir, |tmp| {
        write_json(&tmp.join("config.json"), &model.config.to_hf_json())?;
        let metadata = [("format".to_owned(), "pt".to_owned())].into();
        write_safetensors(&tmp.join("model.safetensors"), tensors, Some(metadata))?;
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
