use es2_wgpu::ops::attention::{self, reference, AttentionShape};
use es2_wgpu::testing::*;
use es2_wgpu::{Gpu, Recorder, Tensor};

const TOL: f64 = 1e-5;

/// One attention problem: seeded inputs and per-sequence lengths (some shorter than the
/// sequence, so padding queries and keys are present).
struct Case {
    shape: AttentionShape,
    seq_lens: Vec<u32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Case {
    fn new(seed: u64, shape: AttentionShape, seq_lens: &[u32]) -> Case {
        assert_eq!(seq_lens.len(), shape.batch);
        let q_numel = shape.q_dims().iter().product();
        let kv_numel = shape.kv_dims().iter().product();
        Case {
            shape,
            seq_lens: seq_lens.to_vec(),
            q: randn(seed, q_numel, 1.0),
            k: randn(seed + 1, kv_numel, 1.0),
            v: randn(seed + 2, kv_numel, 1.0),
        }
    }

    fn scale(&self) -> f32 {
        1.0 / (self.shape.head_dim as f32).sqrt()
    }

    fn name(&self) -> String {
        let s = &self.shape;
        format!(
            "B={} Tq={} Tkv={} off={} Hq={} Hkv={} D={} lens={:?}",
            s.batch,
            s.q_len,
            s.kv_len,
            s.q_offset,
            s.n_heads,
            s.n_kv_heads,
            s.head_dim,
            self.seq_lens
        )
    }

    fn reference_forward(&self) -> (Vec<f64>, Vec<f64>) {
        reference::attention_forward(
            &self.shape,
            &f64s(&self.q),
            &f64s(&self.k),
            &f64s(&self.v),
            &self.seq_lens,
            f64::from(self.scale()),
        )
    }

    fn reference_backward(&self, dout: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        reference::attention_backward(
            &self.shape,
            &f64s(&self.q),
            &f64s(&self.k),
            &f64s(&self.v),
            &f64s(dout),
            &self.seq_lens,
            f64::from(self.scale()),
        )
    }

    fn upload(&self, gpu: &Gpu) -> GpuInputs {
        let s = &self.shape;
        GpuInputs {
            q: upload(gpu, s.q_dims(), &self.q),
            k: upload(gpu, s.kv_dims(), &self.k),
            v: upload(gpu, s.kv_dims(), &self.v),
            seq_lens: Tensor::from_u32(gpu, [s.batch], &self.seq_lens).unwrap(),
        }
    }

    fn record_forward(&self, rec: &mut Recorder, x: &GpuInputs, (out, lse): (&Tensor, &Tensor)) {
        let (s, scale) = (&self.shape, self.scale());
        attention::attention_forward(rec, s, &x.q, &x.k, &x.v, &x.seq_lens, out, lse, scale);
    }

    /// Records the backward from the forward's `out` and `lse` into `g`.
    fn record_backward(
        &self,
        rec: &mut Recorder,
        x: &GpuInputs,
        (out, lse): (&Tensor, &Tensor),
        dout: &Tensor,
        g: &GpuGradients,
    ) {
        let (s, scale) = (&self.shape, self.scale());
        let (q, k, v, lens) = (&x.q, &x.k, &x.v, &x.seq_lens);
        let (dq, dk, dv) = (&g.dq, &g.dk, &g.dv);
        attention::attention_backward(rec, s, q, k, v, out, lse, dout, lens, dq, dk, dv, scale);
    }

    /// The GPU forward into NaN-poisoned outputs: (out, lse) on the device.
    fn gpu_forward(&self, gpu: &Gpu, x: &GpuInputs) -> (Tensor, Tensor) {
        let s = &self.shape;
        let (out, lse) = (poisoned(gpu, s.q_dims()), poisoned(gpu, s.lse_dims()));
        let mut rec = Recorder::new(gpu);
        self.record_forward(&mut rec, x, (&out, &lse));
        rec.finish().unwrap();
        (out, lse)
    }

    /// NaN-poisoned gradient tensors.
    fn poisoned_gradients(&self, gpu: &Gpu) -> GpuGradients {
        let s = &self.shape;
        GpuGradients {
            dq: poisoned(gpu, s.q_dims()),
            dk: poisoned(gpu, s.kv_dims()),
            dv: poisoned(gpu, s.kv_dims()),
        }
    }

    /// The GPU backward (from the GPU forward's out and lse) into NaN-poisoned gradients.
    fn gpu_backward(&self, gpu: &Gpu, dout: &[f32]) -> Gradients {
        let x = self.upload(gpu);
        let (out, lse) = self.gpu_forward(gpu, &x);
        let dout = upload(gpu, self.shape.q_dims(), dout);
        let g = self.poisoned_gradients(gpu);
        let mut rec = Recorder::new(gpu);
        self.record_backward(&mut rec, &x, (&out, &lse), &dout, &g);
        rec.finish().unwrap();
        Gradients {
            dq: download(gpu, &g.dq),
            dk: download(gpu, &g.dk),
            dv: download(gpu, &g.dv),
        }
    }

    fn dout(&self, seed: u64) -> Vec<f32> {
        randn(seed, self.shape.q_dims().iter().product(), 1.0)
    }
}

struct GpuInputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_lens: Tensor,
}

struct GpuGradients {
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
}

struct Gradients {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Training shapes: grouped, ungrouped, multi-query, a single token, odd, unit and large head
/// dimensions; every multi-sequence batch has a padded sequence (one of them empty).
fn training_cases() -> Vec<Case> {
    let t = AttentionShape::training;
    vec![
        Case::new(10, t(2, 37, 6, 2, 12), &[37, 23]),
        Case::new(20, t(1, 1, 2, 1, 8), &[1]),
        Case::new(30, t(3, 19, 3, 3, 8), &[19, 1, 11]),
        // Multi-query; a length past the sequence is clamped to it.
        Case::new(40, t(2, 29, 4, 1, 5), &[40, 17]),
        Case::new(50, t(2, 70, 2, 1, 64), &[70, 41]),
        Case::new(60, t(1, 70, 2, 2, 128), &[57]),
        Case::new(65, t(2, 9, 2, 1, 1), &[6, 0]),
    ]
}

/// Elements of `[B, Tq, Hq, D]` at padding queries.
fn padding_query_elems(s: &AttentionShape, seq_lens: &[u32]) -> Vec<usize> {
    let row = s.n_heads * s.head_dim;
    (0..s.batch)
        .flat_map(|b| (0..s.q_len).map(move |t| (b, t)))
        .filter(|&(b, t)| s.attended_keys(seq_lens[b] as usize, t) == 0)
        .flat_map(|(b, t)| (b * s.q_len + t) * row..(b * s.q_len + t + 1) * row)
        .collect()
}

/// Elements of `[B, Tkv, Hkv, D]` at keys past their sequence's length.
fn padding_key_elems(s: &AttentionShape, seq_lens: &[u32]) -> Vec<usize> {
    let row = s.n_kv_heads * s.head_dim;
    (0..s.batch)
        .flat_map(|b| (0..s.kv_len).map(move |j| (b, j)))
        .filter(|&(b, j)| j >= seq_lens[b] as usize)
        .flat_map(|(b, j)| (b * s.kv_len + j) * row..(b * s.kv_len + j + 1) * row)
        .collect()
}

fn assert_exact_zeros(what: &str, values: &[f32], elems: &[usize]) {
    for &i in elems {
        assert_eq!(
            values[i], 0.0,
            "{what}[{i}] of a padding row is {}",
            values[i]
        );
    }
}

#[test]
fn attention_forward_matches_reference_on_odd_shapes() {
    let gpu = gpu();
    for case in training_cases() {
        let (out, lse) = case.gpu_forward(gpu, &case.upload(gpu));
        let (out, lse) = (download(gpu, &out), download(gpu, &lse));
        let (want_out, want_lse) = case.reference_forward();
        assert_close(
            &format!("attention_forward out {}", case.name()),
            &out,
            &want_out,
            TOL,
        );
        assert_close(
            &format!("attention_forward lse {}", case.name()),
            &lse,
            &want_lse,
            TOL,
        );
        let padding = padding_query_elems(&case.shape, &case.seq_lens);
        assert_exact_zeros("out", &out, &padding);
        // Padding rows' lse is the reference's 0 (checked above); it must be finite.
        assert!(lse.iter().all(|x| x.is_finite()));
    }
}

/// Rows `first..first + count` of every sequence of a `[B, T, H, D]` tensor.
fn slice_rows<T: Copy>(x: &[T], s: &AttentionShape, first: usize, count: usize) -> Vec<T> {
    let row = s.n_heads * s.head_dim;
    (0..s.batch)
        .flat_map(|b| &x[(b * s.kv_len + first) * row..][..count * row])
        .copied()
        .collect()
}

#[test]
fn attention_forward_decodes_against_a_kv_cache() {
    let gpu = gpu();
    // (Tq, q_offset, Tkv cache rows, seq_lens): one new token, and three at once; the second
    // sequence of the first case is shorter than the position, so its query is padding.
    for (seed, q_len, q_offset, kv_len, lens) in [
        (70u64, 1usize, 9usize, 16usize, [10u32, 7]),
        (80, 3, 5, 13, [8, 13]),
    ] {
        let full = Case::new(seed, AttentionShape::training(2, kv_len, 6, 2, 12), &lens);
        let shape = AttentionShape {
            q_len,
            q_offset,
            ..full.shape
        };
        let decode = Case {
            shape,
            seq_lens: lens.to_vec(),
            q: slice_rows(&full.q, &full.shape, q_offset, q_len),
            k: full.k.clone(),
            v: full.v.clone(),
        };
        let (want_out, want_lse) = decode.reference_forward();
        // Decoding gives the rows q_offset.. of the whole sequence's attention.
        let full_rows = slice_rows(&full.reference_forward().0, &full.shape, q_offset, q_len);
        assert!(rel_error_f64(&want_out, &full_rows) < 1e-12);

        let (out, lse) = decode.gpu_forward(gpu, &decode.upload(gpu));
        let (out, lse) = (download(gpu, &out), download(gpu, &lse));
        assert_close(
            &format!("attention decode out {}", decode.name()),
            &out,
            &want_out,
            TOL,
        );
        assert_close(
            &format!("attention decode lse {}", decode.name()),
            &lse,
            &want_lse,
            TOL,
        );
        assert_exact_zeros("out", &out, &padding_query_elems(&shape, &decode.seq_lens));
    }
}

#[test]
fn attention_forward_at_decodes_rows_at_their_own_positions() {
    let gpu = gpu();
    // Three rows after 9, 3 and 12 cached tokens, one or two new tokens each; the last row's
    // length stops before its second query, which is padding.
    for (seed, q_len, starts, lens) in [
        (90u64, 1usize, [9u32, 3, 12], [10u32, 4, 13]),
        (91, 2, [9, 3, 12], [11, 5, 13]),
    ] {
        let full = AttentionShape::training(3, 16, 6, 2, 12);
        let shape = AttentionShape { q_len, ..full };
        let case = Case::new(seed, shape, &lens);
        let scale = case.scale();
        let (want_out, want_lse) = reference::attention_forward_at(
            &shape,
            &f64s(&case.q),
            &f64s(&case.k),
            &f64s(&case.v),
            &lens,
            &starts,
            f64::from(scale),
        );
        let x = case.upload(gpu);
        let lens_and_starts: Vec<u32> = lens.iter().chain(&starts).copied().collect();
        let lens_and_starts = Tensor::from_u32(gpu, [6], &lens_and_starts).unwrap();
        let (out, lse) = (
            poisoned(gpu, shape.q_dims()),
            poisoned(gpu, shape.lse_dims()),
        );
        let mut rec = Recorder::new(gpu);
        attention::attention_forward_at(
            &mut rec,
            &shape,
            &x.q,
            &x.k,
            &x.v,
            &lens_and_starts,
            &out,
            &lse,
            scale,
        );
        rec.finish().unwrap();
        let name = format!("q_len {q_len}, starts {starts:?}, lens {lens:?}");
        assert_close(
            &format!("attention_forward_at out {name}"),
            &download(gpu, &out),
            &want_out,
            TOL,
        );
        assert_close(
            &format!("attention_forward_at lse {name}"),
            &download(gpu, &lse),
            &want_lse,
            TOL,
        );
        if q_len == 2 {
            let row = shape.n_heads * shape.head_dim;
            let padding: Vec<usize> = ((2 * 2 + 1) * row..(2 * 2 + 2) * row).collect();
            assert_exact_zeros("out", &download(gpu, &out), &padding);
        }
    }
}

#[test]
fn attention_backward_matches_reference_and_zeroes_padding() {
    let gpu = gpu();
    for case in training_cases() {
        let dout = case.dout(7);
        let got = case.gpu_backward(gpu, &dout);
        let (dq, dk, dv) = case.reference_backward(&dout);
        let name = case.name();
        assert_close(&format!("attention_backward dq {name}"), &got.dq, &dq, TOL);
        assert_close(&format!("attention_backward dk {name}"), &got.dk, &dk, TOL);
        assert_close(&format!("attention_backward dv {name}"), &got.dv, &dv, TOL);
        let (s, lens) = (&case.shape, &case.seq_lens);
        assert_exact_zeros("dq", &got.dq, &padding_query_elems(s, lens));
        assert_exact_zeros("dk", &got.dk, &padding_key_elems(s, lens));
        assert_exact_zeros("dv", &got.dv, &padding_key_elems(s, lens));
    }
}

#[test]
fn attention_reference_backward_matches_finite_differences() {
    let case = Case::new(90, AttentionShape::training(2, 5, 4, 2, 3), &[5, 3]);
    let (s, lens, scale) = (case.shape, case.seq_lens.clone(), f64::from(case.scale()));
    let (q, k, v, dy) = (
        f64s(&case.q),
        f64s(&case.k),
        f64s(&case.v),
        f64s(&case.dout(91)),
    );
    let (dq, dk, dv) = case.reference_backward(&case.dout(91));
    let loss = |q: &[f64], k: &[f64], v: &[f64]| {
        dot(
            &reference::attention_forward(&s, q, k, v, &lens, scale).0,
            &dy,
        )
    };
    let h = 1e-5;
    let numeric_dq = finite_difference(|x| loss(x, &k, &v), &q, h);
    let numeric_dk = finite_difference(|x| loss(&q, x, &v), &k, h);
    let numeric_dv = finite_difference(|x| loss(&q, &k, x), &v, h);
    assert_gradient("attention_backward dq", &dq, &numeric_dq, 1e-7);
    assert_gradient("attention_backward dk", &dk, &numeric_dk, 1e-7);
    assert_gradient("attention_backward dv", &dv, &numeric_dv, 1e-7);
}

#[test]
fn attention_backward_is_bit_identical_across_runs() {
    let gpu = gpu();
    let case = Case::new(100, AttentionShape::training(2, 37, 6, 2, 12), &[37, 23]);
    let dout = case.dout(101);
    let run = || {
        let g = case.gpu_backward(gpu, &dout);
        [g.dq, g.dk, g.dv].concat()
    };
    assert_bit_identical("attention_backward dq, dk, dv", &run(), &run());
}

/// Informal timing (printed with --nocapture) at a small model's shape.
#[test]
fn attention_timing_at_t256() {
    let gpu = gpu();
    let case = Case::new(110, AttentionShape::training(1, 256, 8, 2, 64), &[256]);
    let s = &case.shape;
    let x = case.upload(gpu);
    let (out, lse) = case.gpu_forward(gpu, &x); // compiles the pipelines
    let dout = upload(gpu, s.q_dims(), &case.dout(111));
    let g = case.poisoned_gradients(gpu);
    let Some(mut rec) = Recorder::timed(gpu) else {
        assert!(!gpu.has_timestamps());
        return;
    };
    case.record_forward(&mut rec, &x, (&out, &lse));
    case.record_backward(&mut rec, &x, (&out, &lse), &dout, &g);
    let times = rec.finish_timed().unwrap();
    for (entry, seconds) in &times {
        eprintln!(
            "timing {entry} B=1 T=256 Hq=8 Hkv=2 D=64: {:.3} ms",
            seconds * 1e3
        );
    }
    assert_eq!(times.len(), 4);
    assert!(times.iter().all(|(_, t)| t.is_finite() && *t >= 0.0));
}
