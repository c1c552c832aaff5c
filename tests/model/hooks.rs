//! The block-loop runner: hooks (add, project out, clamp) at any hidden state, gradient taps
//! at any hidden state, save policies (recomputation gives the same gradients), and hooks at
//! every step of cached decoding (the same as recomputing the whole sequence with them).

use es2_wgpu::model::{
    Batch, Gradients, Hook, HookAction, LoadOptions, Output, Pass, Positions, SamplingOptions,
    SavePolicy, Seeds, Trainable, Transformer,
};
use es2_wgpu::testing::{assert_bit_identical, assert_close, bits, download, gpu, randn, upload};
use es2_wgpu::{Recorder, Tensor};

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

/// Every hidden state and the logits of a pass with `hooks`.
fn run(model: &Transformer, batch: &Batch, hooks: &[Hook]) -> (Vec<Vec<f32>>, Vec<f32>) {
    let pass = Pass::new(Output::Logits)
        .saving(SavePolicy::BlockInputs)
        .with_hooks(hooks);
    let out = model.run_now(gpu(), batch, &pass).unwrap();
    let hidden = (0..=model.layers())
        .map(|i| download(gpu(), out.hidden_state(i)))
        .collect();
    (hidden, download(gpu(), out.logits.as_ref().unwrap()))
}

/// `values [B·T, C]` with the padding rows zeroed, and the real rows alone as the value of an
/// `Add` hook at every position (which acts on real positions only).
fn real_rows_delta(batch: &Batch, cols: usize, values: &[f32]) -> (Vec<f32>, Tensor) {
    let mask = batch.position_mask();
    let mut full = values.to_vec();
    let mut real = Vec::new();
    for (r, &m) in mask.iter().enumerate() {
        let row = &mut full[r * cols..(r + 1) * cols];
        if m == 0 {
            row.fill(0.0);
        } else {
            real.extend_from_slice(row);
        }
    }
    let tensor = upload(gpu(), [real.len() / cols, cols], &real);
    (full, tensor)
}

#[test]
fn an_add_hook_changes_its_hidden_state_by_delta_and_nothing_below_it() {
    let model = model();
    let batch = batch(&model);
    let c = model.config.hidden_size;
    let (delta_values, delta) = real_rows_delta(&batch, c, &randn(4, batch.rows() * c, 0.5));
    let (plain, plain_logits) = run(&model, &batch, &[]);
    for index in 0..=model.layers() {
        let hook = Hook::add(index, Positions::All, delta.clone());
        let (hidden, logits) = run(&model, &batch, &[hook]);
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

/// L = Σ w·logits over real positions, with `w` from a seed.
fn logit_weights(model: &Transformer, batch: &Batch) -> Tensor {
    let v = model.config.vocab_size;
    let mut w = randn(8, batch.rows() * v, 1.0);
    for (r, &m) in batch.position_mask().iter().enumerate() {
        if m == 0 {
            w[r * v..(r + 1) * v].fill(0.0);
        }
    }
    upload(gpu(), [batch.rows(), v], &w)
}

/// The gradient of Σ w·logits at hidden states `taps`, through a pass saving by `save`.
fn tapped_gradients(
    model: &Transformer,
    batch: &Batch,
    w: &Tensor,
    taps: &[usize],
    save: SavePolicy,
    trainable: Trainable,
) -> (Vec<Vec<f32>>, Gradients) {
    let gpu = gpu();
    let grads = Gradients::new(gpu, model, trainable).unwrap();
    let mut rec = Recorder::new(gpu);
    let out = model
        .run(&mut rec, batch, &Pass::new(Output::Logits).saving(save))
        .unwrap();
    let seeds = Seeds {
        logits: Some(w),
        ..Seeds::default()
    };
    let tapped = model
        .backward(&mut rec, batch, out, &seeds, taps, &grads)
        .unwrap();
    rec.finish().unwrap();
    assert_eq!(tapped.len(), taps.len());
    let values = taps
        .iter()
        .map(|t| {
            let (_, g) = tapped.iter().find(|(i, _)| i == t).unwrap();
            download(gpu, g)
        })
        .collect();
    (values, grads)
}

#[test]
fn gradient_taps_at_the_input_and_a_middle_layer_match_directional_differences() {
    let (model, gpu) = (model(), gpu());
    let batch = batch(&model);
    let c = model.config.hidden_size;
    let w = logit_weights(&model, &batch);
    let w_host = download(gpu, &w);
    let middle = model.layers() / 2;
    let (taps, _) = tapped_gradients(
        &model,
        &batch,
        &w,
        &[0, middle],
        SavePolicy::Everything,
        Trainable::Lora,
    );
    for (tap, gradient) in [0, middle].iter().zip(&taps) {
        let (direction, _) =
            real_rows_delta(&batch, c, &randn(9 + *tap as u64, batch.rows() * c, 1.0));
        let loss_at = |eps: f32| -> f64 {
            let scaled: Vec<f32> = direction.iter().map(|d| eps * d).collect();
            let (_, value) = real_rows_delta(&batch, c, &scaled);
            let (_, logits) = run(&model, &batch, &[Hook::add(*tap, Positions::All, value)]);
            logits
                .iter()
                .zip(&w_host)
                .map(|(l, w)| f64::from(*l) * f64::from(*w))
                .sum()
        };
        // Central differences with Richardson extrapolation: the loss is curved enough along a
        // random direction that the plain O(ε²) error would hide a wrong gradient's size, and
        // f32 rounding rules out a much smaller step.
        let central = |eps: f32| (loss_at(eps) - loss_at(-eps)) / (2.0 * f64::from(eps));
        let numeric = (4.0 * central(1e-3) - central(2e-3)) / 3.0;
        let analytic: f64 = gradient
            .iter()
            .zip(&direction)
            .map(|(g, d)| f64::from(*g) * f64::from(*d))
            .sum();
        let err = (numeric - analytic).abs() / analytic.abs();
        eprintln!(
            "gradient at hidden {tap}: analytic {analytic:.6e}, numeric {numeric:.6e}, rel {err:.2e}"
        );
        assert!(
            err < 1e-3,
            "hidden {tap}: analytic {analytic} vs numeric {numeric}"
        );
        // Padding rows get no gradient.
        let pad_row = batch.seq + batch.lens[1];
        assert!(gradient[pad_row * c..(pad_row + 1) * c]
            .iter()
            .all(|&g| g == 0.0));
    }
}

#[test]
fn recomputing_blocks_in_the_backward_gives_identical_gradients() {
    let (model, gpu) = (model(), gpu());
    let batch = batch(&model);
    let w = logit_weights(&model, &batch);
    let taps = [0, 1];
    let (saved_taps, saved) = tapped_gradients(
        &model,
        &batch,
        &w,
        &taps,
        SavePolicy::Everything,
        Trainable::Full,
    );
    let (recomputed_taps, recomputed) = tapped_gradients(
        &model,
        &batch,
        &w,
        &taps,
        SavePolicy::BlockInputs,
        Trainable::Full,
    );
    for (a, b) in saved_taps.iter().zip(&recomputed_taps) {
        assert_bit_identical("tapped gradient", a, b);
    }
    let (a, b) = (saved.named(&model), recomputed.named(&model));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_bit_identical(&x.name, &download(gpu, &x.grad), &download(gpu, &y.grad));
    }
}

#[test]
fn a_pass_that_saves_nothing_gives_the_same_logits() {
    let model = model();
    let batch = batch(&model);
    let (_, saved) = run(&model, &batch, &[]);
    let plain = model
        .run_now(gpu(), &batch, &Pass::new(Output::Logits))
        .unwrap();
    assert_bit_identical(
        "logits",
        &download(gpu(), plain.logits.as_ref().unwrap()),
        &saved,
    );
    assert!(model
        .backward(
            &mut Recorder::new(gpu()),
            &batch,
            plain,
            &Seeds::default(),
            &[],
            &Gradients::new(gpu(), &model, Trainable::Lora).unwrap(),
        )
        .is_err());
}

#[test]
fn project_out_and_clamp_hooks_move_what_they_target() {
    let (model, gpu) = (model(), gpu());
    let batch = batch(&model);
    let c = model.config.hidden_size;
    let layer = 2;
    let w_host = randn(21, c, 1.0);
    let w = upload(gpu, [1, c], &w_host);
    let score = |hidden: &[f32], row: usize, bias: f32| -> f64 {
        hidden[row * c..(row + 1) * c]
            .iter()
            .zip(&w_host)
            .map(|(h, w)| f64::from(*h) * f64::from(*w))
            .sum::<f64>()
            + f64::from(bias)
    };
    let real_rows: Vec<usize> = (0..batch.rows())
        .filter(|&r| batch.position_mask()[r] == 1)
        .collect();

    let ablate = Hook {
        hidden: layer,
        positions: Positions::All,
        action: HookAction::ProjectOut {
            direction: w.clone(),
        },
    };
    let (hidden, _) = run(&model, &batch, &[ablate]);
    for &r in &real_rows {
        assert!(
            score(&hidden[layer], r, 0.0).abs() < 1e-4,
            "row {r} keeps its projection"
        );
    }

    // Clamp the last position's score at a threshold some rows exceed.
    let (plain, _) = run(&model, &batch, &[]);
    let last_rows: Vec<usize> = (0..batch.batch)
        .map(|b| b * batch.seq + batch.lens[b] - 1)
        .collect();
    let bias = 0.1;
    let scores: Vec<f64> = last_rows
        .iter()
        .map(|&r| score(&plain[layer], r, bias))
        .collect();
    let threshold = ((scores[0] + scores[1]) / 2.0) as f32;
    let clamp = Hook {
        hidden: layer,
        positions: Positions::Last,
        action: HookAction::ClampAbove {
            direction: w,
            bias,
            threshold,
        },
    };
    let (hidden, _) = run(&model, &batch, &[clamp]);
    for (&r, &before) in last_rows.iter().zip(&scores) {
        let after = score(&hidden[layer], r, bias);
        if before > f64::from(threshold) {
            assert!(
                (after - f64::from(threshold)).abs() < 1e-4,
                "row {r}: {after}"
            );
        } else {
            assert!(
                (after - before).abs() < 1e-4,
                "row {r} moved: {before} -> {after}"
            );
        }
    }
    // Other positions are untouched.
    let first_row = 0;
    assert_eq!(
        bits(&hidden[layer][first_row * c..(first_row + 1) * c]),
        bits(&plain[layer][first_row * c..(first_row + 1) * c])
    );
}

#[test]
fn greedy_decoding_with_hooks_at_two_layers_matches_recomputing_with_them() {
    let (model, gpu) = (model(), gpu());
    let c = model.config.hidden_size;
    let steer = upload(gpu, [1, c], &randn(31, c, 2.0));
    let direction = upload(gpu, [1, c], &randn(32, c, 1.0));
    let hooks = [
        Hook::add(1, Positions::All, steer),
        Hook {
            hidden: 3,
            positions: Positions::All,
            action: HookAction::ProjectOut {
                direction: direction.clone(),
            },
        },
    ];
    let prompt = vec![5u32, 9, 44, 101];
    let options = SamplingOptions {
        max_tokens: 8,
        ..SamplingOptions::default()
    };
    let cached = model
        .generate_hooked(gpu, &prompt, &options, &hooks, |_| Ok(()))
        .unwrap();
    let unhooked = model.generate(gpu, &prompt, &options, |_| Ok(())).unwrap();
    assert_ne!(
        cached, unhooked,
        "the hooks did not change what was generated"
    );

    // The same tokens by running the whole sequence again at every step, with the hooks.
    let mut sequence = prompt.clone();
    for &expected in &cached {
        let batch = Batch::new(gpu, &[sequence.clone()], model.config.vocab_size).unwrap();
        let pass = Pass::new(Output::LastLogits).with_hooks(&hooks);
        let out = model.run_now(gpu, &batch, &pass).unwrap();
        let logits = download(gpu, out.logits.as_ref().unwrap());
        let next = es2_wgpu::model::generate::argmax(&logits);
        assert_eq!(next, expected, "step {}", sequence.len() - prompt.len());
        sequence.push(next);
    }
}
