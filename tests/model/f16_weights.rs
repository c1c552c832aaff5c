//! Models loaded with 16-bit weight matrices, f16 or bf16 (`LoadOptions::weights`: the block
//! projections, the embedding and the LM head): the forward against transformers and against
//! the f32 load, vocabulary chunks, `auto`, generation, merging adapters, saving, and the
//! refusal to train 16-bit weights. (The LoRA backward with 16-bit weights is in
//! backward.rs.)

use es2_wgpu::gpu::DType;
use es2_wgpu::model::{
    save_pretrained, Batch, Checkpoint, Gradients, LoadOptions, LoraConfig, Output, Pass,
    Projection, SamplingOptions, SavePolicy, Trainable, Transformer, WeightsDtype,
};
use es2_wgpu::rng::Rng;
use es2_wgpu::testing::{assert_bit_identical, assert_close, download, f64s, gpu};
use safetensors::tensor::Dtype;

use crate::fixtures::{model_dir, Reference};
use crate::forward::{check_against_transformers, full_forward};

fn f16_options() -> LoadOptions {
    LoadOptions::with_weights(WeightsDtype::F16)
}

fn bf16_options() -> LoadOptions {
    LoadOptions::with_weights(WeightsDtype::Bf16)
}

fn load(name: &str, options: &LoadOptions) -> Transformer {
    Transformer::load(gpu(), &model_dir(name), options).unwrap()
}

/// The fixture's own sequences as a batch.
fn fixture_batch(name: &str, model: &Transformer) -> Batch {
    let r = Reference::load(name);
    Batch::new(gpu(), &r.sequences(), model.config.vocab_size).unwrap()
}

/// Elements of the weight matrices: the blocks' projections, the embedding, the LM head.
fn matrix_elements(model: &Transformer) -> u64 {
    let projections: u64 = model
        .blocks
        .iter()
        .flat_map(|b| b.proj.values())
        .map(|l| l.weight.numel() as u64)
        .sum();
    let vocab = |m: &es2_wgpu::model::VocabMatrix| (m.rows * m.cols) as u64;
    projections + vocab(&model.embed) + model.lm_head.as_ref().map_or(0, vocab)
}

#[test]
fn qwen2_f16_stored_in_f16_matches_transformers_and_the_f32_load_bit_for_bit() {
    check_against_transformers("qwen2-f16", &f16_options());
    // The file holds f16 values, so f16 storage is exact, and the GEMM widens them exactly
    // before the same f32 arithmetic: the logits cannot differ at all.
    let (half, full) = (
        load("qwen2-f16", &f16_options()),
        load("qwen2-f16", &LoadOptions::default()),
    );
    let batch = fixture_batch("qwen2-f16", &full);
    let (logits16, hidden16) = full_forward(&half, &batch);
    let (logits32, hidden32) = full_forward(&full, &batch);
    assert_bit_identical("qwen2-f16 logits, f16 vs f32 weights", &logits16, &logits32);
    for (i, (h16, h32)) in hidden16.iter().zip(&hidden32).enumerate() {
        assert_bit_identical(&format!("qwen2-f16 hidden_states[{i}]"), h16, h32);
    }
}

#[test]
fn llama_f32_with_weights_rounded_to_f16_stays_close_to_the_f32_load() {
    let (half, full) = (
        load("llama-f32", &f16_options()),
        load("llama-f32", &LoadOptions::default()),
    );
    assert_eq!(
        half.blocks[0].proj[Projection::Q].weight.dtype(),
        DType::F16
    );
    assert_eq!(
        half.blocks[2].proj[Projection::Down].weight.dtype(),
        DType::F16
    );
    assert_eq!(half.embed.dtype(), DType::F16);
    assert_eq!(half.lm_head.as_ref().unwrap().dtype(), DType::F16);
    assert_eq!(half.blocks[0].attn_norm.dtype(), DType::F32);
    let batch = fixture_batch("llama-f32", &full);
    let (logits16, hidden16) = full_forward(&half, &batch);
    let (logits32, hidden32) = full_forward(&full, &batch);
    // f16 keeps 11 significant bits: each weight (projections, embedding, untied LM head)
    // moves by at most 2^-12 of itself (measured: 8.2e-4 relative on the logits).
    assert_close(
        "llama-f32 logits, f16 vs f32 weights",
        &logits16,
        &f64s(&logits32),
        5e-3,
    );
    let last = hidden16.len() - 1;
    assert_close(
        "llama-f32 final hidden state, f16 vs f32 weights",
        &hidden16[last],
        &f64s(&hidden32[last]),
        5e-3,
    );
    // Exactly the weight matrices shrink, by two bytes an element.
    assert_eq!(
        full.parameter_bytes() - half.parameter_bytes(),
        2 * matrix_elements(&full)
    );
    eprintln!(
        "llama-f32 weights: {} bytes in f32, {} with f16 matrices",
        full.parameter_bytes(),
        half.parameter_bytes()
    );
}

/// An f16 embedding and LM head split into many vocabulary chunks (64 rows each; llama-f32's
/// head is untied, so the lookup and the head's product both cross chunks) compute exactly
/// what the f16 matrices in one chunk do.
#[test]
fn f16_vocabulary_matrices_in_chunks_give_the_logits_of_one_chunk() {
    let chunked = LoadOptions {
        max_binding_bytes: Some(64 * 48 * 4),
        ..f16_options()
    };
    let (many, one) = (
        load("llama-f32", &chunked),
        load("llama-f32", &f16_options()),
    );
    assert_eq!((many.embed.chunks.len(), one.embed.chunks.len()), (5, 1));
    assert_eq!(many.lm_head.as_ref().unwrap().dtype(), DType::F16);
    let batch = fixture_batch("llama-f32", &one);
    let (logits_many, _) = full_forward(&many, &batch);
    let (logits_one, _) = full_forward(&one, &batch);
    assert_bit_identical("f16 logits, 5 chunks vs 1", &logits_many, &logits_one);
    // Read back whole, the chunks widen to the values of the one-chunk matrix.
    let (a, b) = (
        many.embed.to_f32(gpu()).unwrap(),
        one.embed.to_f32(gpu()).unwrap(),
    );
    assert_bit_identical("f16 embedding read back, 5 chunks vs 1", &a, &b);
}

/// `auto` keeps the 16-bit type config.json declares (float16: f16, bfloat16: bf16), so the
/// matrices are stored exactly as the checkpoint holds them; f32 checkpoints stay f32.
#[test]
fn auto_weights_follow_the_dtype_the_checkpoint_declares() {
    let auto = LoadOptions::with_weights(WeightsDtype::Auto);
    for (name, want) in [
        ("qwen2-f16", DType::F16),
        ("mistral-bf16-sharded", DType::BF16),
        ("llama-f32", DType::F32),
    ] {
        let model = load(name, &auto);
        assert_eq!(model.embed.dtype(), want, "{name}: the embedding");
        let q = &model.blocks[0].proj[Projection::Q].weight;
        assert_eq!(q.dtype(), want, "{name}: a projection");
    }
}

#[test]
fn generation_with_f16_weights_gives_the_tokens_of_the_f32_load() {
    let gpu = gpu();
    let prompt = [5u32, 17, 250, 3, 99, 42, 7];
    let options = SamplingOptions {
        max_tokens: 10,
        ..SamplingOptions::default()
    };
    let generate = |options_: &LoadOptions| {
        load("qwen2-f16", options_)
            .generate(gpu, &prompt, &options, |_| Ok(()))
            .unwrap()
    };
    let tokens = generate(&f16_options());
    assert_eq!(tokens.len(), 10);
    assert_eq!(tokens, generate(&LoadOptions::default()));
}

/// Fixture model `name` with the same adapters (B nonzero), loaded with `options`.
fn with_adapters(name: &str, options: &LoadOptions) -> Transformer {
    let gpu = gpu();
    let mut model = load(name, options);
    let config = LoraConfig {
        rank: 2,
        ..LoraConfig::default()
    };
    model.attach_lora(gpu, &config, 11).unwrap();
    let mut rng = Rng::new(12);
    for block in &model.blocks {
        for linear in [Projection::Q, Projection::V, Projection::Down].map(|p| &block.proj[p]) {
            let b = &linear.lora.as_ref().unwrap().b;
            b.write_f32(gpu, &rng.normal_vec(b.numel(), 0.1)).unwrap();
        }
    }
    model
}

/// The logits over `batch` with the adapters on.
fn logits_with_adapters(model: &Transformer, batch: &Batch) -> Vec<f32> {
    let out = model
        .run_now(
            gpu(),
            batch,
            &Pass::new(Output::Logits).saving(SavePolicy::BlockInputs),
        )
        .unwrap();
    download(gpu(), out.logits.as_ref().unwrap())
}

#[test]
fn merging_adapters_into_f16_weights_widens_them_to_f32() {
    let gpu = gpu();
    let (mut half, mut full) = (
        with_adapters("qwen2-f16", &f16_options()),
        with_adapters("qwen2-f16", &LoadOptions::default()),
    );
    let batch = fixture_batch("qwen2-f16", &full);
    let unmerged = logits_with_adapters(&half, &batch);
    half.merge_lora(gpu).unwrap();
    full.merge_lora(gpu).unwrap();
    // The merged projections are f32; the embedding (tied head), which no adapter changes,
    // stays in f16.
    assert_eq!(
        half.weights_in_16_bits(),
        [("model.embed_tokens.weight".to_owned(), DType::F16)]
    );
    let (merged16, _) = full_forward(&half, &batch);
    let (merged32, _) = full_forward(&full, &batch);
    // Widening is exact, so both merges compute the same f32 weights.
    assert_bit_identical("merged from f16 vs from f32", &merged16, &merged32);
    assert_close(
        "f16 weights: merged vs adapters on",
        &merged16,
        &f64s(&unmerged),
        1e-5,
    );
}

#[test]
fn saving_writes_f16_projections_that_load_back_exactly() {
    let gpu = gpu();
    let half = load("qwen2-f16", &f16_options());
    let dir = std::env::temp_dir().join(format!("es2-f16-save-{}", std::process::id()));
    let source = model_dir("qwen2-f16");
    save_pretrained(gpu, &half, source.to_str().unwrap(), &dir).unwrap();

    let saved = Checkpoint::open(&dir).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dtype = |name: &str| file.tensor(name).unwrap().dtype();
    assert_eq!(dtype("model.layers.1.mlp.gate_proj.weight"), Dtype::F16);
    assert_eq!(dtype("model.layers.1.self_attn.q_proj.bias"), Dtype::F32);
    assert_eq!(dtype("model.embed_tokens.weight"), Dtype::F16);
    assert_eq!(dtype("model.norm.weight"), Dtype::F32);
    assert!(saved.contains("model.layers.2.self_attn.o_proj.weight"));

    // Loaded back in f32 or f16, the model computes what the original f32 load does.
    let original = load("qwen2-f16", &LoadOptions::default());
    let batch = fixture_batch("qwen2-f16", &original);
    let (want, _) = full_forward(&original, &batch);
    for options in [LoadOptions::default(), f16_options()] {
        let reloaded = Transformer::load(gpu, &dir, &options).unwrap();
        let (got, _) = full_forward(&reloaded, &batch);
        assert_bit_identical(
            &format!("saved f16 weights reloaded ({:?})", options.weights),
            &got,
            &want,
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn full_fine_tuning_of_f16_weights_is_refused_clearly() {
    let gpu = gpu();
    let half = load("llama-f32", &f16_options());
    let err = Gradients::new(gpu, &half, Trainable::Full)
        .expect_err("f16 weights cannot train")
        .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight is stored in f16"),
        "{err}"
    );
    // LoRA on the same model is fine: only the adapters train.
    let mut half = half;
    half.attach_lora(gpu, &LoraConfig::default(), 1).unwrap();
    assert!(Gradients::new(gpu, &half, Trainable::Lora).is_ok());
}

#[test]
fn a_weight_beyond_the_f16_range_is_a_clear_error() {
    let gpu = gpu();
    let dir = std::env::temp_dir().join(format!("es2-f16-range-{}", std::process::id()));
    let model = load("llama-f32", &LoadOptions::default());
    let w = &model.blocks[1].proj[Projection::Up].weight;
    let mut values = download(gpu, w);
    values[7] = 1e6;
    w.write_f32(gpu, &values).unwrap();
    save_pretrained(gpu, &model, model_dir("llama-f32").to_str().unwrap(), &dir).unwrap();
    let err = Transformer::load(gpu, &dir, &f16_options())
        .expect_err("1e6 does not fit f16")
        .to_string();
    assert!(
        err.contains(
            "model.layers.1.mlp.up_proj.weight: element 7 (1000000) is beyond the f16 range"
        ),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- bf16 ----

#[test]
fn mistral_bf16_stored_in_bf16_matches_transformers_and_the_f32_load_bit_for_bit() {
    check_against_transformers("mistral-bf16-sharded", &bf16_options());
    // The file holds bf16 values, so bf16 storage is exact (read as f32 and narrowed back,
    // nothing rounds), and the kernels widen them exactly before the same f32 arithmetic:
    // the logits and every hidden state equal the f32 load's, bit for bit.
    let name = "mistral-bf16-sharded";
    let (brain, full) = (
        load(name, &bf16_options()),
        load(name, &LoadOptions::default()),
    );
    for p in Projection::ALL {
        assert_eq!(brain.blocks[1].proj[p].weight.dtype(), DType::BF16, "{p:?}");
    }
    // A tied head: the embedding serves as the LM head too.
    assert!(brain.lm_head.is_none());
    assert_eq!(brain.embed.dtype(), DType::BF16);
    assert_eq!(brain.blocks[0].attn_norm.dtype(), DType::F32);
    let batch = fixture_batch(name, &full);
    let (logits16, hidden16) = full_forward(&brain, &batch);
    let (logits32, hidden32) = full_forward(&full, &batch);
    assert_bit_identical(
        &format!("{name} logits, bf16 vs f32 weights"),
        &logits16,
        &logits32,
    );
    for (i, (h16, h32)) in hidden16.iter().zip(&hidden32).enumerate() {
        assert_bit_identical(&format!("{name} hidden_states[{i}]"), h16, h32);
    }
    // Read back, the matrices are the checkpoint's values; they take two bytes an element.
    let (a, b) = (
        brain.embed.to_f32(gpu()).unwrap(),
        full.embed.to_f32(gpu()).unwrap(),
    );
    assert_bit_identical("bf16 embedding read back vs f32", &a, &b);
    assert_eq!(
        full.parameter_bytes() - brain.parameter_bytes(),
        2 * matrix_elements(&full)
    );
}

#[test]
fn llama_f32_with_weights_rounded_to_bf16_stays_close_to_the_f32_load() {
    let (brain, full) = (
        load("llama-f32", &bf16_options()),
        load("llama-f32", &LoadOptions::default()),
    );
    assert_eq!(brain.embed.dtype(), DType::BF16);
    assert_eq!(brain.lm_head.as_ref().unwrap().dtype(), DType::BF16);
    let batch = fixture_batch("llama-f32", &full);
    let (logits16, _) = full_forward(&brain, &batch);
    let (logits32, _) = full_forward(&full, &batch);
    // bf16 keeps 8 significant bits: each weight moves by at most 2^-9 of itself (measured:
    // 7.0e-3 relative on the logits).
    assert_close(
        "llama-f32 logits, bf16 vs f32 weights",
        &logits16,
        &f64s(&logits32),
        3e-2,
    );
}

/// A bf16 embedding and LM head in many vocabulary chunks (64 rows each; llama-f32's head is
/// untied) compute exactly what one chunk does, and read back as the one chunk's values.
#[test]
fn bf16_vocabulary_matrices_in_chunks_give_the_logits_of_one_chunk() {
    let chunked = LoadOptions {
        max_binding_bytes: Some(64 * 48 * 4),
        ..bf16_options()
    };
    let (many, one) = (
        load("llama-f32", &chunked),
        load("llama-f32", &bf16_options()),
    );
    assert_eq!((many.embed.chunks.len(), one.embed.chunks.len()), (5, 1));
    assert_eq!(many.lm_head.as_ref().unwrap().dtype(), DType::BF16);
    let batch = fixture_batch("llama-f32", &one);
    let (logits_many, _) = full_forward(&many, &batch);
    let (logits_one, _) = full_forward(&one, &batch);
    assert_bit_identical("bf16 logits, 5 chunks vs 1", &logits_many, &logits_one);
    let (a, b) = (
        many.embed.to_f32(gpu()).unwrap(),
        one.embed.to_f32(gpu()).unwrap(),
    );
    assert_bit_identical("bf16 embedding read back, 5 chunks vs 1", &a, &b);
}

/// With adapters on (each projection's LoRA path summed into its product of the bf16
/// weight), generation and merging: the bf16 load of a bf16 checkpoint computes what its f32
/// load does, bit for bit.
#[test]
fn adapters_generation_and_merging_on_bf16_weights_match_the_f32_load() {
    let gpu = gpu();
    let name = "mistral-bf16-sharded";
    let prompt = [5u32, 17, 250, 3, 99, 42, 7];
    let sampling = SamplingOptions {
        max_tokens: 10,
        ..SamplingOptions::default()
    };
    let generate = |options: &LoadOptions| {
        load(name, options)
            .generate(gpu, &prompt, &sampling, |_| Ok(()))
            .unwrap()
    };
    let tokens = generate(&bf16_options());
    assert_eq!(tokens.len(), 10);
    assert_eq!(tokens, generate(&LoadOptions::default()));

    let (mut brain, mut full) = (
        with_adapters(name, &bf16_options()),
        with_adapters(name, &LoadOptions::default()),
    );
    let batch = fixture_batch(name, &full);
    let on16 = logits_with_adapters(&brain, &batch);
    let on32 = logits_with_adapters(&full, &batch);
    assert_bit_identical("adapters on, bf16 vs f32 weights", &on16, &on32);
    brain.merge_lora(gpu).unwrap();
    full.merge_lora(gpu).unwrap();
    // The merged projections are f32; the embedding (tied head) stays in bf16.
    assert_eq!(
        brain.weights_in_16_bits(),
        [("model.embed_tokens.weight".to_owned(), DType::BF16)]
    );
    let (merged16, _) = full_forward(&brain, &batch);
    let (merged32, _) = full_forward(&full, &batch);
    assert_bit_identical("merged from bf16 vs from f32", &merged16, &merged32);
}

#[test]
fn saving_writes_bf16_matrices_that_load_back_exactly() {
    let gpu = gpu();
    let name = "mistral-bf16-sharded";
    let brain = load(name, &bf16_options());
    let dir = std::env::temp_dir().join(format!("es2-bf16-save-{}", std::process::id()));
    let source = model_dir(name);
    save_pretrained(gpu, &brain, source.to_str().unwrap(), &dir).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dtype = |name: &str| file.tensor(name).unwrap().dtype();
    assert_eq!(dtype("model.layers.1.mlp.gate_proj.weight"), Dtype::BF16);
    assert_eq!(dtype("model.embed_tokens.weight"), Dtype::BF16);
    assert_eq!(dtype("model.norm.weight"), Dtype::F32);

    let original = load(name, &LoadOptions::default());
    let batch = fixture_batch(name, &original);
    let (want, _) = full_forward(&original, &batch);
    for options in [LoadOptions::default(), bf16_options()] {
        let reloaded = Transformer::load(gpu, &dir, &options).unwrap();
        let (got, _) = full_forward(&reloaded, &batch);
        assert_bit_identical(
            &format!("saved bf16 weights reloaded ({:?})", options.weights),
            &got,
            &want,
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn full_fine_tuning_of_bf16_weights_is_refused_clearly() {
    let brain = load("mistral-bf16-sharded", &bf16_options());
    let err = Gradients::new(gpu(), &brain, Trainable::Full)
        .expect_err("bf16 weights cannot train")
        .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight is stored in bf16"),
        "{err}"
    );
}

#[test]
fn a_weight_beyond_the_bf16_range_is_a_clear_error() {
    let gpu = gpu();
    let dir = std::env::temp_dir().join(format!("es2-bf16-range-{}", std::process::id()));
    let model = load("llama-f32", &LoadOptions::default());
    let w = &model.blocks[0].proj[Projection::Gate].weight;
    let mut values = download(gpu, w);
    // The largest f32 rounds up past bf16's largest finite value.
    values[3] = f32::MAX;
    w.write_f32(gpu, &values).unwrap();
    save_pretrained(gpu, &model, model_dir("llama-f32").to_str().unwrap(), &dir).unwrap();
    let err = Transformer::load(gpu, &dir, &bf16_options())
        .expect_err("f32::MAX does not fit bf16")
        .to_string();
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight: element 3")
            && err.contains("is beyond the bf16 range"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
