use es2_wgpu::ops::separation::{
    self, reference, Distance, LossShape, Pair, SeparationInputs, SeparationOptions,
    SeparationOutputs,
};
use es2_wgpu::rng::Rng;
use es2_wgpu::testing::*;
use es2_wgpu::Recorder;

const TOL: f64 = 1e-5;
const PAIRS: [Pair; 3] = [Pair::Centroid, Pair::Pairwise, Pair::BaseCentroid];
const DISTANCES: [Distance; 3] = [Distance::L2, Distance::SqL2, Distance::Cosine];
const SHAPES: [LossShape; 2] = [LossShape::Hinge, LossShape::Neg];
const GRAD_SCALE: f32 = 0.8 / 3.0;

/// One layer stack of embeddings: harmful `[L, nH, C]`, harmless `[L, nS, C]` (the base
/// centroid `[L, C]` for base-centroid), ν and margins `[L]`.
#[derive(Clone)]
struct Batch {
    dims: [usize; 4],
    /// The harmless side is a base centroid `[L, C]`.
    base: bool,
    eh: Vec<f32>,
    es: Vec<f32>,
    nu: Vec<f32>,
    margin: Vec<f32>,
}

impl Batch {
    fn random(seed: u64, [layers, n_h, n_s, cols]: [usize; 4], pair: Pair) -> Batch {
        let n_s = if pair == Pair::BaseCentroid { 1 } else { n_s };
        Batch {
            dims: [layers, n_h, n_s, cols],
            base: pair == Pair::BaseCentroid,
            eh: randn(seed, layers * n_h * cols, 1.0),
            es: randn(seed + 1, layers * n_s * cols, 1.0),
            nu: Rng::new(seed + 2).uniform_vec(layers, 0.5, 2.0),
            margin: vec![0.0; layers],
        }
    }

    fn harmless_dims(&self) -> Vec<usize> {
        let [layers, _, n_s, cols] = self.dims;
        if self.base {
            vec![layers, cols]
        } else {
            vec![layers, n_s, cols]
        }
    }

    /// Margins that keep the hinge active on every layer but the last (2·D and 0.5·D).
    fn with_margins_around_distance(mut self, options: &SeparationOptions) -> Batch {
        let (dist, _) = self.reference_loss(options);
        let layers = dist.len();
        self.margin = dist
            .iter()
            .enumerate()
            .map(|(l, d)| {
                (if l + 1 < layers {
                    2.0 * d + 0.1
                } else {
                    0.5 * d
                }) as f32
            })
            .collect();
        self
    }

    fn reference_loss(&self, o: &SeparationOptions) -> (Vec<f64>, Vec<f64>) {
        let (eh, es) = (f64s(&self.eh), f64s(&self.es));
        let (nu, margin) = (f64s(&self.nu), f64s(&self.margin));
        reference::separation_loss(&eh, &es, &nu, &margin, self.dims[3], o)
    }

    fn reference_grad(&self, o: &SeparationOptions) -> (Vec<f64>, Vec<f64>) {
        let (eh, es) = (f64s(&self.eh), f64s(&self.es));
        let (nu, margin) = (f64s(&self.nu), f64s(&self.margin));
        let scale = f64::from(GRAD_SCALE);
        reference::separation_grad(&eh, &es, &nu, &margin, self.dims[3], o, scale)
    }
}

/// GPU outputs of one call: `(per_layer [2, L], d_harmful, d_harmless)`, poisoned beforehand.
struct GpuOut {
    per_layer: Vec<f32>,
    deh: Vec<f32>,
    des: Option<Vec<f32>>,
}

fn run_loss(batch: &Batch, options: &SeparationOptions, with_des: bool) -> GpuOut {
    let gpu = gpu();
    let [layers, n_h, _, cols] = batch.dims;
    let harmless_dims = batch.harmless_dims();
    let eh = upload(gpu, [layers, n_h, cols], &batch.eh);
    let es = upload(gpu, harmless_dims.clone(), &batch.es);
    let (nu, margin) = (
        upload(gpu, [layers], &batch.nu),
        upload(gpu, [layers], &batch.margin),
    );
    let per_layer = poisoned(gpu, [2, layers]);
    let deh = poisoned(gpu, [layers, n_h, cols]);
    let des = poisoned(gpu, harmless_dims);
    let inputs = SeparationInputs {
        harmful: &eh,
        harmless: &es,
        nu: &nu,
        margin: &margin,
    };
    let outputs = SeparationOutputs {
        per_layer: &per_layer,
        d_harmful: &deh,
        d_harmless: with_des.then_some(&des),
    };
    let mut rec = Recorder::new(gpu);
    separation::separation_loss(&mut rec, &inputs, &outputs, options, GRAD_SCALE);
    rec.finish().unwrap();
    GpuOut {
        per_layer: download(gpu, &per_layer),
        deh: download(gpu, &deh),
        des: with_des.then(|| download(gpu, &des)),
    }
}

fn run_distance(batch: &Batch, options: &SeparationOptions) -> Vec<f32> {
    let gpu = gpu();
    let [layers, n_h, _, cols] = batch.dims;
    let eh = upload(gpu, [layers, n_h, cols], &batch.eh);
    let es = upload(gpu, batch.harmless_dims(), &batch.es);
    let (nu, dist) = (upload(gpu, [layers], &batch.nu), poisoned(gpu, [layers]));
    let mut rec = Recorder::new(gpu);
    separation::separation_distance(&mut rec, &eh, &es, &nu, options, &dist);
    rec.finish().unwrap();
    download(gpu, &dist)
}

fn every_option() -> Vec<SeparationOptions> {
    let mut all = Vec::new();
    for pair in PAIRS {
        for distance in DISTANCES {
            for shape in SHAPES {
                for harmful_only in [false, true] {
                    all.push(SeparationOptions {
                        pair,
                        distance,
                        shape,
                        harmful_only,
                    });
                }
            }
        }
    }
    all
}

fn label(o: &SeparationOptions, dims: [usize; 4]) -> String {
    let only = if o.harmful_only { " harmful-only" } else { "" };
    let [l, h, s, c] = dims;
    format!(
        "separation {:?}/{:?}/{:?}{only} {l}x{h}x{s}x{c}",
        o.pair, o.distance, o.shape
    )
}

/// GPU vs reference (distances, losses, both gradients), and the reference gradient vs
/// finite differences of the reference loss.
fn check_against_reference(batch: &Batch, o: &SeparationOptions) {
    let name = label(o, batch.dims);
    let out = run_loss(batch, o, true);
    let (dist, loss) = batch.reference_loss(o);
    let (deh, des) = batch.reference_grad(o);
    let layers = dist.len();
    assert_close(&format!("{name} D"), &out.per_layer[..layers], &dist, TOL);
    assert_close(&format!("{name} phi"), &out.per_layer[layers..], &loss, TOL);
    assert_close(&format!("{name} deh"), &out.deh, &deh, TOL);
    assert_close(
        &format!("{name} des"),
        out.des.as_deref().unwrap(),
        &des,
        TOL,
    );

    let cols = batch.dims[3];
    let (eh, es) = (f64s(&batch.eh), f64s(&batch.es));
    let (nu, margin) = (f64s(&batch.nu), f64s(&batch.margin));
    let total = |eh: &[f64], es: &[f64]| {
        let (_, loss) = reference::separation_loss(eh, es, &nu, &margin, cols, o);
        f64::from(GRAD_SCALE) * loss.iter().sum::<f64>()
    };
    let numeric = finite_difference(|x| total(x, &es), &eh, 1e-5);
    assert_gradient(&format!("{name} deh"), &deh, &numeric, 1e-6);
    if o.grad_to_harmless() {
        let numeric = finite_difference(|x| total(&eh, x), &es, 1e-5);
        assert_gradient(&format!("{name} des"), &des, &numeric, 1e-6);
    }
}

#[test]
fn separation_loss_matches_reference_for_every_option_combination() {
    for (seed, dims) in [(1u64, [3, 5, 3, 37]), (2, [2, 1, 1, 1])] {
        for o in every_option() {
            let batch = Batch::random(seed, dims, o.pair).with_margins_around_distance(&o);
            check_against_reference(&batch, &o);
        }
    }
}

#[test]
fn separation_gradients_are_zero_not_nan_at_non_differentiable_points() {
    // Pair (h0, s0) coincides (l2 has no gradient at distance 0) and h1 is a zero vector
    // (cosine has none there).
    let mut batch = Batch::random(3, [1, 2, 2, 5], Pair::Pairwise);
    batch.es[..5].copy_from_slice(&batch.eh[..5]);
    batch.eh[5..].fill(0.0);
    for distance in [Distance::L2, Distance::Cosine] {
        let o = SeparationOptions {
            pair: Pair::Pairwise,
            distance,
            shape: LossShape::Neg,
            harmful_only: false,
        };
        let out = run_loss(&batch, &o, true);
        let (deh, des) = batch.reference_grad(&o);
        let name = label(&o, batch.dims);
        assert_close(&format!("{name} guarded deh"), &out.deh, &deh, TOL);
        assert_close(
            &format!("{name} guarded des"),
            out.des.as_deref().unwrap(),
            &des,
            TOL,
        );
    }
}

#[test]
fn hinge_gradient_is_exactly_zero_once_the_distance_reaches_the_margin() {
    for pair in PAIRS {
        for distance in DISTANCES {
            let neg = SeparationOptions {
                pair,
                distance,
                shape: LossShape::Neg,
                harmful_only: false,
            };
            let mut batch = Batch::random(4, [3, 5, 3, 37], pair);
            let measured = run_loss(&batch, &neg, true).per_layer;
            // Layer 0 sits exactly on the margin (D = m), the others beyond it (D > m).
            let layers = batch.nu.len();
            batch.margin = (0..layers)
                .map(|l| {
                    if l == 0 {
                        measured[l]
                    } else {
                        0.9 * measured[l]
                    }
                })
                .collect();
            let hinge = SeparationOptions {
                shape: LossShape::Hinge,
                ..neg
            };
            let out = run_loss(&batch, &hinge, true);
            let des = out.des.unwrap();
            let zero_bits = |xs: &[f32]| xs.iter().all(|x| x.to_bits() == 0);
            let name = label(&hinge, batch.dims);
            assert!(
                zero_bits(&out.deh) && zero_bits(&des),
                "{name}: gradient not +0"
            );
            assert!(zero_bits(&out.per_layer[layers..]), "{name}: loss not 0");
            assert_eq!(bits(&out.per_layer[..layers]), bits(&measured[..layers]));
        }
    }
}

#[test]
fn centroid_with_one_prompt_per_side_equals_pairwise() {
    for distance in DISTANCES {
        let options = |pair| SeparationOptions {
            pair,
            distance,
            shape: LossShape::Neg,
            harmful_only: false,
        };
        let batch = Batch::random(5, [3, 1, 1, 37], Pair::Pairwise);
        let centroid = run_loss(&batch, &options(Pair::Centroid), true);
        let pairwise = run_loss(&batch, &options(Pair::Pairwise), true);
        let name = format!("centroid = pairwise, one prompt per side, {distance:?}");
        let pairs = [
            (&centroid.per_layer, &pairwise.per_layer, "D, phi"),
            (&centroid.deh, &pairwise.deh, "deh"),
            (
                centroid.des.as_ref().unwrap(),
                pairwise.des.as_ref().unwrap(),
                "des",
            ),
        ];
        for (c, p, what) in pairs {
            assert_close(&format!("{name} {what}"), c, &f64s(p), 1e-6);
        }
    }
}

#[test]
fn separation_distance_matches_reference_beyond_the_loss_limits() {
    // 70 x 65 = 4,550 pairs: more than separation_loss keeps, nothing separation_distance keeps.
    for (seed, dims) in [(6u64, [3, 5, 3, 37]), (7, [2, 70, 65, 9])] {
        for pair in PAIRS {
            for distance in DISTANCES {
                let o = SeparationOptions {
                    pair,
                    distance,
                    ..Default::default()
                };
                let batch = Batch::random(seed, dims, pair);
                let (want, _) = batch.reference_loss(&o);
                let name = format!("{} distance only", label(&o, batch.dims));
                assert_close(&name, &run_distance(&batch, &o), &want, TOL);
            }
        }
    }
}

#[test]
fn separation_loss_handles_the_largest_pair_count() {
    let o = SeparationOptions {
        pair: Pair::Pairwise,
        shape: LossShape::Neg,
        ..Default::default()
    };
    let batch = Batch::random(8, [1, 64, 64, 5], o.pair);
    let out = run_loss(&batch, &o, true);
    let (deh, des) = batch.reference_grad(&o);
    let name = label(&o, batch.dims);
    assert_close(
        &format!("{name} D"),
        &out.per_layer[..1],
        &batch.reference_loss(&o).0,
        TOL,
    );
    assert_close(&format!("{name} deh"), &out.deh, &deh, TOL);
    assert_close(&format!("{name} des"), &out.des.unwrap(), &des, TOL);
}

#[test]
#[should_panic(expected = "exceed")]
fn separation_loss_refuses_more_pairs_than_it_can_hold() {
    let o = SeparationOptions {
        pair: Pair::Pairwise,
        ..Default::default()
    };
    run_loss(&Batch::random(9, [1, 65, 64, 3], o.pair), &o, true);
}

#[test]
fn harmful_only_needs_no_harmless_gradient_buffer() {
    let o = SeparationOptions {
        pair: Pair::Pairwise,
        harmful_only: true,
        ..Default::default()
    };
    let batch = Batch::random(10, [3, 5, 3, 37], o.pair).with_margins_around_distance(&o);
    let with = run_loss(&batch, &o, true);
    let without = run_loss(&batch, &o, false);
    assert_eq!(bits(&with.deh), bits(&without.deh));
    assert_eq!(bits(&with.per_layer), bits(&without.per_layer));
}

#[test]
fn separation_loss_is_bit_identical_across_runs() {
    for (pair, distance) in [
        (Pair::Pairwise, Distance::L2),
        (Pair::Centroid, Distance::Cosine),
    ] {
        let o = SeparationOptions {
            pair,
            distance,
            ..Default::default()
        };
        let batch = Batch::random(11, [3, 5, 3, 37], pair).with_margins_around_distance(&o);
        let (a, b) = (run_loss(&batch, &o, true), run_loss(&batch, &o, true));
        assert_bit_identical("separation_loss per_layer", &a.per_layer, &b.per_layer);
        assert_bit_identical("separation_loss deh", &a.deh, &b.deh);
        let (des_a, des_b) = (a.des.unwrap(), b.des.unwrap());
        assert_bit_identical("separation_loss des", &des_a, &des_b);
    }
}
