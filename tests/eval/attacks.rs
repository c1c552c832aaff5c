//! Each attack moves what it targets, on the real stories260K checkpoint (on the GPU): SCAV's
//! clamp brings the probe's P(harmful) to P0, RepE adds c·ν along its direction, ablation
//! leaves no component along the refusal direction (as hooks, and orthogonalised into the
//! weights), the soft prompt's loss falls at least tenfold, and GCG's loss falls.

use std::path::PathBuf;

use es2_wgpu::eval::attacks::ablation::ablation_hooks;
use es2_wgpu::eval::attacks::gcg::{allowed_tokens, search, GcgSettings};
use es2_wgpu::eval::attacks::repe::{steering_hooks, unit_towards_harmless};
use es2_wgpu::eval::attacks::scav::{clamp_hooks, measure};
use es2_wgpu::eval::attacks::soft_prompt::{optimise, SoftPrompt, SoftPromptSettings};
use es2_wgpu::eval::geometry::{dot, norm};
use es2_wgpu::eval::layers::{analyse, Embeddings, LayerFindings};
use es2_wgpu::eval::probe::ProbeOptions;
use es2_wgpu::eval::prompts::{builtin_harmful, builtin_harmless, draw, DrawSizes, Drawn};
use es2_wgpu::eval::subject::{Prompting, Subject};
use es2_wgpu::model::{
    open_model, save_orthogonalised, Batch, Hook, LoadOptions, LoraConfig, Output, Transformer,
};
use es2_wgpu::ops::pool::Pool;
use es2_wgpu::rng::Rng;
use es2_wgpu::testing::{assert_close, gpu, rel_error};
use es2_wgpu::text::Tokenizer;

fn stories_dir() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/stories260K")
        .to_string_lossy()
        .into_owned()
}

fn stories() -> (Transformer, Tokenizer) {
    open_model(gpu(), &stories_dir(), &LoadOptions::default()).unwrap()
}

fn subject<'a>(model: &'a Transformer, tokenizer: &'a Tokenizer) -> Subject<'a> {
    Subject {
        model,
        tokenizer,
        adapters: true,
        prompting: Prompting {
            chat: true,
            max_len: 64,
        },
    }
}

/// 6 answered prompts and 24 + 24 probe prompts of each side.
fn drawn() -> (Drawn, Drawn) {
    let sizes = DrawSizes {
        answered: 6,
        probe: 48,
    };
    (
        draw(builtin_harmful().unwrap(), sizes, 5, "harmful").unwrap(),
        draw(builtin_harmless().unwrap(), sizes, 6, "harmless").unwrap(),
    )
}

fn findings(
    subject: &Subject,
    harmful: &Drawn,
    harmless: &Drawn,
) -> (Embeddings, Vec<LayerFindings>) {
    let embeddings = Embeddings::measure(gpu(), subject, harmful, harmless, Pool::Last).unwrap();
    let nu = embeddings.harmless_norms();
    let findings = analyse(&embeddings, &nu, &ProbeOptions::default()).unwrap();
    (embeddings, findings)
}

fn batch(subject: &Subject, prompts: &[String]) -> Batch {
    let ids = subject.encode_all(prompts).unwrap();
    Batch::new(gpu(), &ids, subject.model.config.vocab_size).unwrap()
}

#[test]
fn scav_clamps_each_probe_to_p0_where_it_was_above_and_leaves_the_rest() {
    let (model, tokenizer) = stories();
    let subject = subject(&model, &tokenizer);
    let (harmful, harmless) = drawn();
    let (_, findings) = findings(&subject, &harmful, &harmless);
    for f in &findings {
        eprintln!("hidden {}: probe accuracy {:?}", f.layer, f.probe_accuracy);
    }
    // Two probes in order: the second reads the state the first one's clamp changed.
    let probes = vec![(2, &findings[2].probe), (4, &findings[4].probe)];
    let mixed: Vec<String> = harmful
        .answered
        .iter()
        .chain(&harmless.answered)
        .cloned()
        .collect();
    let batch = batch(&subject, &mixed);
    let mut fired = 0;
    for p0 in [1e-3, 1e-2, 5e-2] {
        let steps = measure(gpu(), &subject, &batch, &probes, p0).unwrap();
        for step in steps.iter().flatten() {
            if step.before > p0 * (1.0 + 1e-3) {
                fired += 1;
                assert!(step.fired(), "{step:?} above P0 {p0} did not fire");
                assert!(
                    (step.after - p0).abs() < 1e-4,
                    "hidden {}: P(harmful) {} -> {} (P0 {p0})",
                    step.layer,
                    step.before,
                    step.after
                );
            } else if step.before < p0 * (1.0 - 1e-3) {
                assert!(!step.fired(), "{step:?} below P0 {p0} fired");
                assert!((step.after - step.before).abs() < 1e-6, "{step:?} moved");
            }
        }
    }
    assert!(
        fired >= 6,
        "only {fired} clamps fired: the test checks too little"
    );
    // The hooks' settings are the probe's: a threshold of σ⁻¹(P0) on wᵀh + b.
    assert_eq!(clamp_hooks(gpu(), &probes, 0.01).unwrap().len(), 2);
}

/// Pooled (last position) hidden state `layer` of `batch` with `hooks` applied before the
/// capture.
fn captured(subject: &Subject, batch: &Batch, layer: usize, hooks: &[Hook]) -> Vec<f64> {
    let mut all = hooks.to_vec();
    all.push(Hook::capture(layer, Pool::Last));
    let forward = subject
        .run(gpu(), batch, Output::Hidden(layer), &all)
        .unwrap();
    let values = forward
        .captured(all.len() - 1)
        .unwrap()
        .to_f32(gpu())
        .unwrap();
    values.iter().map(|&x| f64::from(x)).collect()
}

#[test]
fn repe_adds_c_nu_along_the_harmless_direction() {
    let (model, tokenizer) = stories();
    let subject = subject(&model, &tokenizer);
    let (harmful, harmless) = drawn();
    let (embeddings, findings) = findings(&subject, &harmful, &harmless);
    let layer = 2;
    let unit = unit_towards_harmless(&findings[layer].difference).unwrap();
    let nu = embeddings.harmless_norms()[layer];
    let c = 1.5;
    let hooks = steering_hooks(gpu(), &[(layer, unit.clone(), nu)], c).unwrap();
    let batch = batch(&subject, &harmful.answered);
    let plain = captured(&subject, &batch, layer, &[]);
    let steered = captured(&subject, &batch, layer, &hooks);
    let cols = subject.width();
    for (p, s) in plain.chunks(cols).zip(steered.chunks(cols)) {
        let moved: Vec<f64> = s.iter().zip(p).map(|(a, b)| a - b).collect();
        let along = dot(&moved, &unit);
        assert!(
            (along - c * nu).abs() < 1e-4 * c * nu,
            "moved {along} along, want {}",
            c * nu
        );
        assert!(
            norm(&moved) < (c * nu) * (1.0 + 1e-4),
            "moved off the direction"
        );
    }
    // The direction points from the harmful centroid towards the harmless one.
    assert!(dot(&findings[layer].difference, &unit) < 0.0);
}

#[test]
fn ablation_leaves_no_component_along_the_direction_at_any_block_input() {
    let (model, tokenizer) = stories();
    let subject = subject(&model, &tokenizer);
    let (harmful, harmless) = drawn();
    let (_, findings) = findings(&subject, &harmful, &harmless);
    let direction = &findings[3].difference;
    let unit: Vec<f64> = direction.iter().map(|d| d / norm(direction)).collect();
    let hooks = ablation_hooks(gpu(), subject.layers(), direction).unwrap();
    let batch = batch(&subject, &harmful.answered);
    let cols = subject.width();
    for layer in 1..subject.layers() {
        let plain = captured(&subject, &batch, layer, &[]);
        let ablated = captured(&subject, &batch, layer, &hooks);
        for (p, a) in plain.chunks(cols).zip(ablated.chunks(cols)) {
            assert!(
                dot(p, &unit).abs() > 1e-3 * norm(p),
                "nothing to remove at {layer}"
            );
            assert!(
                dot(a, &unit).abs() < 1e-5 * norm(a),
                "hidden {layer}: {} left along the direction",
                dot(a, &unit)
            );
        }
    }
}

#[test]
fn the_soft_prompt_loss_falls_tenfold() {
    let (model, tokenizer) = stories();
    let subject = subject(&model, &tokenizer);
    let (harmful, _) = drawn();
    let slotted = subject.encode_slotted(&harmful.answered[0]).unwrap();
    let settings = SoftPromptSettings {
        tokens: 5,
        max_steps: 40,
        stop_on_success: false,
        ..SoftPromptSettings::default()
    };
    let target = tokenizer.encode_piece(&settings.target).unwrap();
    let mut soft = SoftPrompt::new(gpu(), &subject, &slotted, settings.tokens).unwrap();
    let before = soft.values.clone();
    let run = optimise(gpu(), &subject, &mut soft, &target, &settings).unwrap();
    eprintln!("soft prompt: {run:?}");
    assert_eq!(run.steps, 40);
    assert!(
        run.final_loss * 10.0 <= run.initial_loss,
        "loss {} -> {}",
        run.initial_loss,
        run.final_loss
    );
    assert_ne!(soft.values, before);
}

#[test]
fn the_gcg_loss_falls() {
    let (model, tokenizer) = stories();
    let subject = subject(&model, &tokenizer);
    let (harmful, _) = drawn();
    let slotted = subject.encode_slotted(&harmful.answered[1]).unwrap();
    let settings = GcgSettings {
        suffix_tokens: 6,
        top_k: 16,
        candidates: 8,
        batch: 8,
        steps: 4,
        ..GcgSettings::small()
    };
    let target = tokenizer.encode_piece(&settings.target).unwrap();
    let allowed = allowed_tokens(&subject).unwrap();
    let searched = search(
        gpu(),
        &subject,
        &slotted,
        &target,
        &allowed,
        &settings,
        &mut Rng::new(3),
    )
    .unwrap();
    eprintln!("gcg: {searched:?}");
    assert!(
        searched.final_loss < searched.initial_loss,
        "loss {} -> {}",
        searched.initial_loss,
        searched.final_loss
    );
    assert!(searched.suffix.iter().all(|&t| allowed[t as usize]));
}

/// stories260K with rank-2 adapters on every projection, B nonzero (the same for every call).
fn stories_with_adapters() -> (Transformer, Tokenizer) {
    let (mut model, tokenizer) = stories();
    let config = LoraConfig {
        rank: 2,
        ..LoraConfig::default()
    };
    model.attach_lora(gpu(), &config, 11).unwrap();
    let mut rng = Rng::new(12);
    for block in &model.blocks {
        for (_, linear) in block.proj.iter() {
            let b = &linear.lora.as_ref().unwrap().b;
            b.write_f32(gpu(), &rng.normal_vec(b.numel(), 0.1)).unwrap();
        }
    }
    (model, tokenizer)
}

/// Next-token logits at the last position of each sequence of `batch`.
fn last_logits(subject: &Subject, batch: &Batch) -> Vec<f32> {
    let forward = subject.run(gpu(), batch, Output::LastLogits, &[]).unwrap();
    forward.logits.unwrap().to_f32(gpu()).unwrap()
}

#[test]
fn the_orthogonalised_model_writes_nothing_along_the_direction_and_merges_its_adapters() {
    let (model, tokenizer) = stories_with_adapters();
    let subject = subject(&model, &tokenizer);
    let (harmful, harmless) = drawn();
    let (_, findings) = findings(&subject, &harmful, &harmless);
    let direction = &findings[3].difference;
    let unit: Vec<f64> = direction.iter().map(|d| d / norm(direction)).collect();
    let root = std::env::temp_dir().join(format!("es2-orthogonal-{}", std::process::id()));
    let (from_host, from_gpu) = (root.join("host-merge"), root.join("gpu-merge"));
    save_orthogonalised(gpu(), &model, true, direction, &stories_dir(), &from_host).unwrap();

    let (written, written_tokenizer) =
        open_model(gpu(), &from_host.to_string_lossy(), &LoadOptions::default()).unwrap();
    let ablated = self::subject(&written, &written_tokenizer);
    let batch = batch(&ablated, &harmful.answered);
    let cols = ablated.width();
    // The embedding is the hooked model's ablated one, exactly.
    let hooks = ablation_hooks(gpu(), subject.layers(), direction).unwrap();
    let hooked: Vec<f64> = captured(&subject, &batch, 0, &hooks);
    let embedded: Vec<f32> = captured(&ablated, &batch, 0, &[])
        .iter()
        .map(|&x| x as f32)
        .collect();
    assert_close("ablated embedding", &embedded, &hooked, 1e-6);
    // Nothing the written blocks write has a component along the direction.
    for layer in 0..ablated.layers() {
        for row in captured(&ablated, &batch, layer, &[]).chunks(cols) {
            assert!(
                dot(row, &unit).abs() < 1e-5 * norm(row),
                "hidden {layer}: {} along the direction",
                dot(row, &unit)
            );
        }
    }
    // The adapters merged on the host are the GPU's merge.
    let (mut merged, _) = stories_with_adapters();
    merged.merge_lora(gpu()).unwrap();
    save_orthogonalised(gpu(), &merged, false, direction, &stories_dir(), &from_gpu).unwrap();
    let (reference, _) =
        open_model(gpu(), &from_gpu.to_string_lossy(), &LoadOptions::default()).unwrap();
    let reference = self::subject(&reference, &written_tokenizer);
    let expected: Vec<f64> = last_logits(&reference, &batch)
        .iter()
        .map(|&x| f64::from(x))
        .collect();
    let error = rel_error(&last_logits(&ablated, &batch), &expected);
    assert!(error < 1e-5, "host and GPU merges differ by {error}");
    // Written with the adapters off, it is another model.
    let unmerged = root.join("no-adapters");
    save_orthogonalised(gpu(), &model, false, direction, &stories_dir(), &unmerged).unwrap();
    let (plain, _) =
        open_model(gpu(), &unmerged.to_string_lossy(), &LoadOptions::default()).unwrap();
    let plain = self::subject(&plain, &written_tokenizer);
    assert!(rel_error(&last_logits(&plain, &batch), &expected) > 1e-3);
    std::fs::remove_dir_all(&root).unwrap();
}
