//! Generation: a per-layer KV cache, incremental decoding, and sampling (greedy, temperature,
//! nucleus).

use super::batch::Batch;
use super::hooks::Hook;
use super::runner::{CacheTarget, Output, Pass};
use super::transformer::Transformer;
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::rng::Rng;
use crate::{Error, Result};

/// Keys and values of every layer for `rows` sequences decoded side by side,
/// `[rows, capacity, n_kv_heads, head_dim]`; each row holds its own number of tokens.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    capacity: usize,
    lens: Vec<usize>,
}

impl KvCache {
    /// Tokens cached so far (in the longest row).
    pub fn len(&self) -> usize {
        self.lens.iter().copied().max().unwrap_or(0)
    }

    /// Tokens cached so far in each row.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Whether no token has been decoded into it yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most tokens a row holds (prompt and generated together); [`Transformer::decode`]
    /// refuses tokens past it.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The sequences it holds.
    pub fn rows(&self) -> usize {
        self.lens.len()
    }
}

/// How to pick each next token.
#[derive(Debug, Clone)]
pub struct SamplingOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// 0 is greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Seeds the sampler (unused when greedy): the same seed, prompt and model on the same
    /// device give the same tokens.
    pub seed: u64,
    /// Generation stops after producing one of these.
    pub stop_ids: Vec<u32>,
    /// Run the LoRA adapters, if any.
    pub adapters: bool,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            max_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_ids: Vec::new(),
            adapters: true,
        }
    }
}

impl SamplingOptions {
    /// Rejects a temperature below 0 and a `top_p` outside (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            let message = format!("must be 0 (greedy) or more, got {}", self.temperature);
            return Err(Error::config("sampling.temperature", message));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            let message = format!("must be in (0, 1], got {}", self.top_p);
            return Err(Error::config("sampling.top_p", message));
        }
        Ok(())
    }
}

impl Transformer {
    /// An empty cache for one sequence of up to `capacity` tokens.
    pub fn kv_cache(&self, gpu: &Gpu, capacity: usize) -> KvCache {
        self.kv_cache_rows(gpu, 1, capacity)
    }

    /// An empty cache for `rows` sequences of up to `capacity` tokens each.
    pub fn kv_cache_rows(&self, gpu: &Gpu, rows: usize, capacity: usize) -> KvCache {
        let c = &self.config;
        let dims = [rows, capacity, c.num_key_value_heads, c.head_dim];
        let layer = || Tensor::empty(gpu, dims, DType::F32);
        KvCache {
            k: (0..self.layers()).map(|_| layer()).collect(),
            v: (0..self.layers()).map(|_| layer()).collect(),
            capacity,
            lens: vec![0; rows],
        }
    }

    /// Runs `ids` after the tokens already in `cache`, appends their keys and values, and
    /// returns the logits at the last of them. `hooks` act on these tokens (their positions
    /// count the cached ones: [`Positions::Last`](super::Positions::Last) is the newest).
    pub fn decode(
        &self,
        gpu: &Gpu,
        cache: &mut KvCache,
        ids: &[u32],
        adapters: bool,
        hooks: &[Hook],
    ) -> Result<Vec<f32>> {
        let mut logits = self.decode_rows(gpu, cache, &[ids.to_vec()], adapters, hooks)?;
        logits
            .pop()
            .ok_or_else(|| Error::InvalidArgument("decoding produced no logits".into()))
    }

    /// [`Transformer::decode`] for every sequence of `cache` at once: `rows[b]` (at least one
    /// token) follows row `b`'s cached tokens; rows may bring different numbers of tokens.
    /// Returns each row's logits at its last token.
    pub fn decode_rows(
        &self,
        gpu: &Gpu,
        cache: &mut KvCache,
        rows: &[Vec<u32>],
        adapters: bool,
        hooks: &[Hook],
    ) -> Result<Vec<Vec<f32>>> {
        if rows.len() != cache.rows() {
            return Err(Error::InvalidArgument(format!(
                "the KV cache holds {} rows; {} were given",
                cache.rows(),
                rows.len()
            )));
        }
        // Every row takes the batch's width in the cache (its padding lands past its end).
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        if let Some(&most) = cache
            .lens
            .iter()
            .filter(|&&n| n + width > cache.capacity)
            .max()
        {
            return Err(Error::InvalidArgument(format!(
                "the KV cache holds {} tokens; {} more do not fit",
                cache.capacity,
                most + width - cache.capacity
            )));
        }
        let after: Vec<usize> = cache
            .lens
            .iter()
            .zip(rows)
            .map(|(n, r)| n + r.len())
            .collect();
        let batch = Batch::new(gpu, rows, self.config.vocab_size)?;
        let slots: Vec<u32> = (0..rows.len())
            .flat_map(|b| (0..width).map(move |t| (b, t)))
            .map(|(b, t)| (b * cache.capacity + cache.lens[b] + t) as u32)
            .collect();
        let slots = Tensor::from_u32(gpu, [slots.len()], &slots)?;
        let starts: Vec<u32> = cache.lens.iter().map(|&n| n as u32).collect();
        let lens_and_starts: Vec<u32> = after
            .iter()
            .map(|&n| n as u32)
            .chain(starts.clone())
            .collect();
        let starts_tensor = Tensor::from_u32(gpu, [rows.len()], &starts)?;
        let lens_and_starts = Tensor::from_u32(gpu, [2 * rows.len()], &lens_and_starts)?;
        let target = CacheTarget {
            k: &cache.k,
            v: &cache.v,
            past: &cache.lens,
            capacity: cache.capacity,
            starts: &starts_tensor,
            slots: &slots,
            lens_and_starts: &lens_and_starts,
        };
        let pass = Pass {
            adapters,
            ..Pass::new(Output::LastLogits)
        }
        .with_hooks(hooks);
        let mut rec = Recorder::new(gpu);
        let forward = self.run_with(&mut rec, &batch, &pass, Some(target))?;
        rec.finish()?;
        cache.lens = after;
        let logits = forward
            .logits
            .ok_or_else(|| Error::InvalidArgument("decoding produced no logits".into()))?
            .to_f32(gpu)?;
        let vocab = self.config.vocab_size;
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    /// Generates after `prompt`, calling `on_token` with each new id as it is made; returns
    /// the generated ids (without the prompt).
    pub fn generate(
        &self,
        gpu: &Gpu,
        prompt: &[u32],
        options: &SamplingOptions,
        on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Vec<u32>> {
        self.generate_hooked(gpu, prompt, options, &[], on_token)
    }

    /// [`Transformer::generate`] with `hooks` acting on the prompt and again at every decoding
    /// step (an attack that steers the residual stream keeps steering what is generated).
    pub fn generate_hooked(
        &self,
        gpu: &Gpu,
        prompt: &[u32],
        options: &SamplingOptions,
        hooks: &[Hook],
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Vec<u32>> {
        let mut out = self.generate_rows(gpu, &[prompt.to_vec()], options, hooks, |_, id| {
            on_token(id)
        })?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Continuations of many prompts, each decoded with the prompts of similar length beside
    /// it, up to `max_rows` at a time (which costs little more than one on a GPU). Returned in
    /// the order of `prompts`. Each is what [`Transformer::generate`] gives it alone up to the
    /// rounding of sums whose split depends on how many rows run together (see
    /// `ops::matmul`), which can tip a near tie; the same prompts give the same ids.
    pub fn generate_batch(
        &self,
        gpu: &Gpu,
        prompts: &[Vec<u32>],
        options: &SamplingOptions,
        max_rows: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| prompts[i].len());
        let mut out = vec![Vec::new(); prompts.len()];
        for chunk in order.chunks(max_rows.max(1)) {
            let rows: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
            let replies = self.generate_rows(gpu, &rows, options, &[], |_, _| Ok(()))?;
            for (&i, reply) in chunk.iter().zip(replies) {
                out[i] = reply;
            }
        }
        Ok(out)
    }

    /// The decoding loop: continues prompts side by side, each row sampling from its own
    /// generator seeded with `options.seed` and stopping on its own (a row that has stopped
    /// rides along until every row has); `on_token(row, id)` sees each new id.
    pub fn generate_rows(
        &self,
        gpu: &Gpu,
        prompts: &[Vec<u32>],
        options: &SamplingOptions,
        hooks: &[Hook],
        mut on_token: impl FnMut(usize, u32) -> Result<()>,
    ) -> Result<Vec<Vec<u32>>> {
        if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
            return Err(Error::InvalidArgument("the prompt has no tokens".into()));
        }
        options.validate()?;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let context = self.config.max_position_embeddings;
        if longest + options.max_tokens > context {
            let message = format!(
                "a {longest}-token prompt and {} new tokens exceed the model's context of \
                 {context} tokens",
                options.max_tokens
            );
            return Err(Error::config("sampling.max_tokens", message));
        }
        let mut cache = self.kv_cache_rows(gpu, prompts.len(), longest + options.max_tokens);
        let mut rngs = vec![Rng::new(options.seed); prompts.len()];
        let mut logits = self.decode_rows(gpu, &mut cache, prompts, options.adapters, hooks)?;
        let mut out = vec![Vec::new(); prompts.len()];
        let mut running = vec![options.max_tokens > 0; prompts.len()];
        loop {
            for (row, reply) in out.iter_mut().enumerate() {
                if !running[row] {
                    continue;
                }
                let next = sample(
                    &logits[row],
                    options.temperature,
                    options.top_p,
                    &mut rngs[row],
                );
                reply.push(next);
                on_token(row, next)?;
                running[row] =
                    !options.stop_ids.contains(&next) && reply.len() < options.max_tokens;
            }
            if !running.contains(&true) {
                return Ok(out);
            }
            // A stopped row repeats its last token: its logits are never read again.
            let step: Vec<Vec<u32>> = out.iter().map(|r| r[r.len() - 1..].to_vec()).collect();
            logits = self.decode_rows(gpu, &mut cache, &step, options.adapters, hooks)?;
        }
    }
}

/// Picks a token from `logits`: argmax at temperature 0, else a draw from the temperature-
/// scaled softmax restricted to the top-p nucleus.
pub fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut Rng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (i as u32, f64::from((z - max) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= f64::from(top_p) {
            cut = i + 1;
            break;
        }
    }
    let nucleus = &probs[..cut];
    let mass: f64 = nucleus.iter().map(|p| p.1).sum();
    let mut draw = rng.uniform() * mass;
    for &(id, p) in nucleus {
        draw -= p;
        if draw <= 0.0 {
            return id;
        }
    }
    nucleus[nucleus.len() - 1].0
}

/// Index of the largest logit (the first on ties, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &z) in logits.iter().enumerate() {
        if z > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_nucleus_sampling() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut rng = Rng::new(1);
        assert_eq!(sample(&logits, 0.0, 1.0, &mut rng), 1);
        // A tiny nucleus keeps only the top token whatever the temperature.
        assert!((0..50).all(|_| sample(&logits, 5.0, 0.01, &mut rng) == 1));
        // A wide one at high temperature reaches other tokens.
        let seen: std::collections::HashSet<u32> = (0..200)
            .map(|_| sample(&logits, 5.0, 1.0, &mut rng))
            .collect();
        assert!(seen.len() >= 3, "{seen:?}");
        assert_eq!(argmax(&[1.0, 5.0, 5.0]), 1);
    }
}
