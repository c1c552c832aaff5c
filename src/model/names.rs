//! Parameter names, once: the projections of a block as an enum, storage indexed by it, and the
//! table that maps every parameter to its Hugging Face (and PEFT) tensor name. Loading,
//! gradients, saving, LoRA targets and dropout seeds all go through here.

use std::fmt;
use std::ops::{Index, IndexMut};

use serde::{Deserialize, Serialize};

use super::config::Architecture;
use crate::{Error, Result};

/// The seven linear projections of a decoder block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Projection {
    /// Queries: `[Hq·D, C]` (`self_attn.q_proj`).
    Q,
    /// Keys: `[Hkv·D, C]` (`self_attn.k_proj`).
    K,
    /// Values: `[Hkv·D, C]` (`self_attn.v_proj`).
    V,
    /// Attention output: `[C, Hq·D]` (`self_attn.o_proj`).
    O,
    /// The MLP's gate, through SiLU: `[F, C]` (`mlp.gate_proj`).
    Gate,
    /// The MLP's up projection, multiplied by the gate: `[F, C]` (`mlp.up_proj`).
    Up,
    /// The MLP's output: `[C, F]` (`mlp.down_proj`).
    Down,
}

impl Projection {
    /// Every projection, in the order of a block's forward (and of PEFT's target lists).
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The short name (`q`, `gate`), as configurations and the command line write it.
    pub fn short(self) -> &'static str {
        match self {
            Projection::Q => "q",
            Projection::K => "k",
            Projection::V => "v",
            Projection::O => "o",
            Projection::Gate => "gate",
            Projection::Up => "up",
            Projection::Down => "down",
        }
    }

    /// The module name (`q_proj`), as Hugging Face checkpoints and PEFT write it.
    pub fn module(self) -> String {
        format!("{}_proj", self.short())
    }

    /// Position in [`Projection::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Reads a short name (`q`) or a module name (`q_proj`); anything else is an error that
    /// lists the names there are.
    pub fn parse(name: &str) -> Result<Projection> {
        let short = name.strip_suffix("_proj").unwrap_or(name);
        Projection::ALL
            .into_iter()
            .find(|p| p.short() == short)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown projection '{name}' (expected one of {})",
                    Projection::ALL.map(Projection::short).join(", ")
                ))
            })
    }

    fn group(self) -> &'static str {
        match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
            Projection::Gate | Projection::Up | Projection::Down => "mlp",
        }
    }
}

impl fmt::Display for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

/// One value per projection, indexed by [`Projection`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PerProjection<T>([T; 7]);

impl<T> PerProjection<T> {
    /// The value `f(p)` for every projection `p`.
    pub fn from_fn(mut f: impl FnMut(Projection) -> T) -> Self {
        PerProjection(Projection::ALL.map(&mut f))
    }

    /// Like [`PerProjection::from_fn`], stopping at the first error.
    pub fn try_from_fn<E>(mut f: impl FnMut(Projection) -> Result<T, E>) -> Result<Self, E> {
        let mut values = Vec::with_capacity(7);
        for p in Projection::ALL {
            values.push(f(p)?);
        }
        let array: [T; 7] = values
            .try_into()
            .unwrap_or_else(|_| unreachable!("one value per projection"));
        Ok(PerProjection(array))
    }

    /// Every projection with its value, in [`Projection::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Projection, &T)> {
        Projection::ALL.into_iter().zip(self.0.iter())
    }

    /// Every projection with its value, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Projection, &mut T)> {
        Projection::ALL.into_iter().zip(self.0.iter_mut())
    }

    /// The values alone, in [`Projection::ALL`] order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }
}

impl<T> Index<Projection> for PerProjection<T> {
    type Output = T;
    fn index(&self, p: Projection) -> &T {
        &self.0[p.index()]
    }
}

impl<T> IndexMut<Projection> for PerProjection<T> {
    fn index_mut(&mut self, p: Projection) -> &mut T {
        &mut self.0[p.index()]
    }
}

/// A parameter of a Llama-family decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Param {
    /// The token embedding `[vocab, C]`.
    Embed,
    /// The RMSNorm weight before attention in block `layer`.
    AttnNorm(usize),
    /// The RMSNorm weight before the MLP in block `layer`.
    MlpNorm(usize),
    /// A projection's weight `[out, in]`.
    Weight(usize, Projection),
    /// A projection's bias `[out]`.
    Bias(usize, Projection),
    /// A LoRA adapter's down (`A`, `[r, in]`) or up (`B`, `[out, r]`) matrix.
    Lora(usize, Projection, LoraMatrix),
    /// The final RMSNorm weight.
    FinalNorm,
    /// The output projection `[vocab, C]` (absent when tied to the embedding).
    LmHead,
}

/// The two matrices of a LoRA adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraMatrix {
    /// The down projection `[r, in]` (PEFT's `lora_A`).
    A,
    /// The up projection `[out, r]` (PEFT's `lora_B`).
    B,
}

/// How one architecture names its tensors.
#[derive(Debug)]
struct NameTable {
    embed: &'static str,
    layers: &'static str,
    attn_norm: &'static str,
    mlp_norm: &'static str,
    final_norm: &'static str,
    lm_head: &'static str,
    /// What PEFT puts before a base tensor's module path.
    peft_prefix: &'static str,
}

/// Llama, Mistral and Qwen2 share transformers' `LlamaModel` naming.
const LLAMA_NAMES: NameTable = NameTable {
    embed: "model.embed_tokens.weight",
    layers: "model.layers",
    attn_norm: "input_layernorm",
    mlp_norm: "post_attention_layernorm",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    peft_prefix: "base_model.model",
};

fn table(architecture: Architecture) -> &'static NameTable {
    match architecture {
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 => &LLAMA_NAMES,
    }
}

impl Param {
    /// The tensor's name in a Hugging Face checkpoint (for LoRA matrices, in a PEFT adapter).
    pub fn hf_name(self, architecture: Architecture) -> String {
        let t = table(architecture);
        let module = |layer: usize, p: Projection| {
            format!("{}.{layer}.{}.{}", t.layers, p.group(), p.module())
        };
        match self {
            Param::Embed => t.embed.to_owned(),
            Param::AttnNorm(layer) => format!("{}.{layer}.{}.weight", t.layers, t.attn_norm),
            Param::MlpNorm(layer) => format!("{}.{layer}.{}.weight", t.layers, t.mlp_norm),
            Param::Weight(layer, p) => format!("{}.weight", module(layer, p)),
            Param::Bias(layer, p) => format!("{}.bias", module(layer, p)),
            Param::Lora(layer, p, matrix) => {
                let m = match matrix {
                    LoraMatrix::A => "A",
                    LoraMatrix::B => "B",
                };
                format!("{}.{}.lora_{m}.weight", t.peft_prefix, module(layer, p))
            }
            Param::FinalNorm => t.final_norm.to_owned(),
            Param::LmHead => t.lm_head.to_owned(),
        }
    }
}

impl Param {
    /// The layer, projection and matrix of a PEFT LoRA tensor name under `architecture`'s
    /// table, or `None` for any other name.
    pub fn parse_lora(
        name: &str,
        architecture: Architecture,
    ) -> Option<(usize, Projection, LoraMatrix)> {
        let t = table(architecture);
        let rest = name.strip_prefix(t.peft_prefix)?.strip_prefix('.')?;
        let rest = rest.strip_prefix(t.layers)?.strip_prefix('.')?;
        let layer: usize = rest.split('.').next()?.parse().ok()?;
        Projection::ALL.into_iter().find_map(|p| {
            [LoraMatrix::A, LoraMatrix::B]
                .into_iter()
                .find(|&m| Param::Lora(layer, p, m).hf_name(architecture) == name)
                .map(|m| (layer, p, m))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_transformers_and_peft() {
        let arch = Architecture::Qwen2;
        assert_eq!(
            Param::Weight(3, Projection::Gate).hf_name(arch),
            "model.layers.3.mlp.gate_proj.weight"
        );
        assert_eq!(
            Param::Bias(0, Projection::K).hf_name(arch),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            Param::AttnNorm(2).hf_name(arch),
            "model.layers.2.input_layernorm.weight"
        );
        let lora = Param::Lora(1, Projection::O, LoraMatrix::B).hf_name(arch);
        assert_eq!(
            lora,
            "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
        );
        assert_eq!(
            Param::parse_lora(&lora, arch),
            Some((1, Projection::O, LoraMatrix::B))
        );
        let wrong_group = "base_model.model.model.layers.1.mlp.o_proj.lora_B.weight";
        assert_eq!(Param::parse_lora(wrong_group, arch), None);
    }

    #[test]
    fn projections_parse_by_short_or_module_name_and_reject_others() {
        assert_eq!(Projection::parse("gate").unwrap(), Projection::Gate);
        assert_eq!(Projection::parse("down_proj").unwrap(), Projection::Down);
        let err = Projection::parse("qq").unwrap_err().to_string();
        assert!(
            err.contains("'qq'") && err.contains("q, k, v, o, gate, up, down"),
            "{err}"
        );
        let per = PerProjection::from_fn(Projection::index);
        assert_eq!(per[Projection::Up], 5);
    }
}
