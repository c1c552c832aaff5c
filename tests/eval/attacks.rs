//! Each attack moves what it targets, on the real stories260K checkpoint (on the GPU): SCAV's
//! clamp brings the probe's P(harmful) to P0, RepE adds c·ν along its direction, ablation
//! leaves no component along the refusal direction, the soft prompt's loss falls at least
//! tenfold, and GCG's loss falls.

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
use es2_wgpu::model::{open_model, Batch, Hook, LoadOptions, Output, Transformer};
use es2_wgpu::ops::pool::Pool;
use es2_wgpu::rng::Rng;
use es2_wgpu::testing::gpu;
use es2_wgpu::text::Tokenizer;

fn stories() -> (Transformer, Tokenizer) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/stories260K");
    open_model(gpu(), &dir.to_string_lossy(), &LoadOptions::default()).unwrap()
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
