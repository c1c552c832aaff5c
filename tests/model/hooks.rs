//! The forward's hooks: a perturbation added to one hidden state, and the backward's gradient
//! with respect to the input embeddings (what white-box attacks on the embedding space use).

use es2_wgpu::model::{
    Batch, ForwardSpec, Gradients, LoadOptions, Perturbation, Seeds, Trainable, Transformer,
};
use es2_wgpu::testing::{assert_close, bits, download, gpu, randn, upload};
use es2_wgpu::Recorder;

use crate::fixtures::model_dir;

fn model() -> Transformer {
    Transformer::load(gpu(), &model_dir("llama-f32"), &LoadOptions::default()).unwrap()
}

fn batch(model: &Transformer) -> Batch {
    Batch::new(
        gpu(),
        &[vec![5, 9, 44, 101, 7], vec![17, 2, 200]],
        model.config.vocab_size,
    )
    .unwrap()
}

fn run(
    model: &Transformer,
    batch: &Batch,
    perturb: Option<Perturbation>,
) -> (Vec<Vec<f32>>, Vec<f32>) {
    let spec = ForwardSpec {
        perturb,
        ..ForwardSpec::full(model.layers())
    };
    let out = model.forward_now(gpu(), batch, &spec).unwrap();
    let hidden = (0..=model.layers())
        .map(|i| download(gpu(), out.hidden_state(i)))
        .collect();
    (hidden, download(gpu(), out.logits.as_ref().unwrap()))
}

#[test]
fn a_perturbation_changes_its_hidden_state_by_delta_and_nothing_below_it() {
    let (model, gpu) = (model(), gpu());
    let batch = batch(&model);
    let c = model.config.hidden_size;
    let delta_values = randn(4, batch.rows() * c, 0.5);
    let delta = upload(gpu, [batch.rows(), c], &delta_values);
    let (plain, plain_logits) = run(&model, &batch, None);
    for index in 0..=model.layers() {
        let (hidden, logits) = run(
            &model,
            &batch,
            Some(Perturbation {
                hidden: index,
                delta: &delta,
            }),
        );
        for below in 0..index {
            assert_eq!(
                bits(&hidden[below]),
                bits(&plain[below]),
                "hidden {below} moved for a perturbation at {index}"
            );
        }
        let want: Vec<f64> = plain[index]
            .iter()
            .zip(&delta_values)
            .map(|(h, d)| f64::from(*h) + f64::from(*d))
            .collect();
        assert_close(
            &format!("hidden_states[{index}] + delta"),
            &hidden[index],
            &want,
            1e-6,
        );
        assert_ne!(
            bits(&logits),
            bits(&plain_logits),
            "a perturbation at {index} left the logits alone"
        );
    }
}

#[test]
fn input_embedding_gradient_matches_directional_differences_through_a_perturbation() {
    let (model, gpu) = (model(), gpu());
    let batch = batch(&model);
    let (c, v) = (model.config.hidden_size, model.config.vocab_size);
    let mask = batch.position_mask();
    let mut w = randn(8, batch.rows() * v, 1.0);
    for (r, &m) in mask.iter().enumerate() {
        if m == 0 {
            w[r * v..(r + 1) * v].fill(0.0);
        }
    }
    let w = upload(gpu, [batch.rows(), v], &w);
    // L = Σ w·logits; its gradient with respect to hidden_states[0] from the backward.
    let grads = Gradients::new(gpu, &model, Trainable::Lora).unwrap();
    let mut rec = Recorder::new(gpu);
    let out = model.forward(&mut rec, &batch, &ForwardSpec::full(model.layers()));
    let seeds = Seeds {
        logits: Some(&w),
        hidden: &[],
    };
    let d_embed = model
        .backward(&mut rec, &batch, &out, &seeds, &grads)
        .unwrap();
    rec.finish().unwrap();
    let d_embed = download(gpu, &d_embed);

    let direction = randn(9, batch.rows() * c, 1.0);
    let loss_at = |eps: f32| -> f64 {
        let delta: Vec<f32> = direction.iter().map(|d| eps * d).collect();
        let delta = upload(gpu, [batch.rows(), c], &delta);
        let (_, logits) = run(
            &model,
            &batch,
            Some(Perturbation {
                hidden: 0,
                delta: &delta,
            }),
        );
        let w = download(gpu, &w);
        logits
            .iter()
            .zip(&w)
            .map(|(l, w)| f64::from(*l) * f64::from(*w))
            .sum()
    };
    // Central differences with Richardson extrapolation: the loss is curved enough along a
    // random direction that the plain O(ε²) error would hide a wrong gradient's size, and f32
    // rounding rules out a much smaller step.
    let central = |eps: f32| (loss_at(eps) - loss_at(-eps)) / (2.0 * f64::from(eps));
    let numeric = (4.0 * central(1e-3) - central(2e-3)) / 3.0;
    let analytic: f64 = d_embed
        .iter()
        .zip(&direction)
        .map(|(g, d)| f64::from(*g) * f64::from(*d))
        .sum();
    let err = (numeric - analytic).abs() / analytic.abs();
    eprintln!(
        "input-embedding gradient: analytic {analytic:.6e}, numeric {numeric:.6e}, rel {err:.2e}"
    );
    assert!(err < 1e-3, "analytic {analytic} vs numeric {numeric}");
    // Padding rows get no gradient.
    let pad_row = batch.seq + batch.lens[1];
    assert!(d_embed[pad_row * c..(pad_row + 1) * c]
        .iter()
        .all(|&g| g == 0.0));
}
