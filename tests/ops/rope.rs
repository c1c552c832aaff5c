use es2_wgpu::ops::rope::{self, reference, rope_inv_freq, Llama3RopeScaling};
use es2_wgpu::testing::*;
use es2_wgpu::{Recorder, Tensor};

const TOL: f64 = 1e-5;

/// Llama 3.1's `rope_scaling`.
const LLAMA31: Llama3RopeScaling = Llama3RopeScaling {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 8192,
};

/// `(forward, backward)` on the GPU for `[B, T, H, D]` inputs `x` (forward) and `dout`
/// (backward), into NaN-poisoned outputs.
fn gpu_rope(
    x: &[f32],
    dout: &[f32],
    inv_freq: &[f32],
    dims: [usize; 4],
    pos_offset: usize,
) -> (Vec<f32>, Vec<f32>) {
    let gpu = gpu();
    let (tx, tdout) = (upload(gpu, dims, x), upload(gpu, dims, dout));
    let tfreq = upload(gpu, [inv_freq.len()], inv_freq);
    let (tout, tdx) = (poisoned(gpu, dims), poisoned(gpu, dims));
    let mut rec = Recorder::new(gpu);
    rope::rope_forward(&mut rec, &tx, &tfreq, &tout, pos_offset);
    rope::rope_backward(&mut rec, &tdout, &tfreq, &tdx, pos_offset);
    rec.finish().unwrap();
    (download(gpu, &tout), download(gpu, &tdx))
}

/// GPU forward and backward against the references.
fn check(name: &str, seed: u64, dims: [usize; 4], inv_freq: &[f32], pos_offset: usize) -> Vec<f32> {
    let n = dims.iter().product();
    let (x, dout) = (randn(seed, n, 1.0), randn(seed + 1, n, 1.0));
    let (out, dx) = gpu_rope(&x, &dout, inv_freq, dims, pos_offset);
    let want = reference::rope_forward(&f64s(&x), inv_freq, dims, pos_offset);
    assert_close(&format!("rope_forward {name}"), &out, &want, TOL);
    let want = reference::rope_backward(&f64s(&dout), inv_freq, dims, pos_offset);
    assert_close(&format!("rope_backward {name}"), &dx, &want, TOL);
    dx
}

#[test]
fn rope_matches_reference_for_several_head_dims() {
    // D = 8 is stories260K's head dim; T = 37 with B = 1 is odd-shaped and has a unit dim.
    for (seed, dims) in [
        (1u64, [2, 5, 3, 8]),
        (2, [2, 5, 3, 12]),
        (3, [1, 37, 3, 64]),
    ] {
        let inv_freq = rope_inv_freq(dims[3], 10_000.0, None);
        check(&format!("{dims:?} offset 7"), seed, dims, &inv_freq, 7);
    }
}

#[test]
fn rope_forward_at_puts_each_row_at_its_own_positions() {
    let gpu = gpu();
    let dims = [3, 2, 3, 8];
    let starts = [0usize, 5, 131];
    let n = dims.iter().product();
    let x = randn(11, n, 1.0);
    let inv_freq = rope_inv_freq(8, 10_000.0, None);
    let (tx, tfreq) = (upload(gpu, dims, &x), upload(gpu, [4], &inv_freq));
    let starts_u32: Vec<u32> = starts.iter().map(|&s| s as u32).collect();
    let tstarts = Tensor::from_u32(gpu, [3], &starts_u32).unwrap();
    let tout = poisoned(gpu, dims);
    let mut rec = Recorder::new(gpu);
    rope::rope_forward_at(&mut rec, &tx, &tfreq, &tout, &tstarts);
    rec.finish().unwrap();
    let want = reference::rope_forward_at(&f64s(&x), &inv_freq, dims, &starts);
    assert_close("rope_forward_at", &download(gpu, &tout), &want, TOL);
    // Each row is the uniform rotation at its own offset.
    let row = n / 3;
    for (b, &start) in starts.iter().enumerate() {
        let alone =
            reference::rope_forward(&f64s(&x[b * row..][..row]), &inv_freq, [1, 2, 3, 8], start);
        assert_eq!(&want[b * row..][..row], alone.as_slice(), "row {b}");
    }
}

#[test]
fn rope_stays_accurate_at_long_context_positions() {
    // Llama 3.1 near its 128k context: angles up to ~131k radians at inv_freq 1.
    let dims = [1, 4, 3, 64];
    let inv_freq = rope_inv_freq(64, 500_000.0, Some(&LLAMA31));
    check("[1, 4, 3, 64] offset 131000", 4, dims, &inv_freq, 131_000);
}

#[test]
fn rope_backward_is_bit_identical_across_runs() {
    let dims = [2, 5, 3, 12];
    let n = dims.iter().product();
    let inv_freq = rope_inv_freq(12, 10_000.0, None);
    let (x, dout) = (randn(5, n, 1.0), randn(6, n, 1.0));
    let first = gpu_rope(&x, &dout, &inv_freq, dims, 3).1;
    let second = gpu_rope(&x, &dout, &inv_freq, dims, 3).1;
    assert_bit_identical("rope_backward", &first, &second);
}

#[test]
fn rope_reference_backward_matches_finite_differences() {
    let dims = [2, 3, 2, 8];
    let n = dims.iter().product();
    let inv_freq = rope_inv_freq(8, 10_000.0, None);
    let (x, dy) = (f64s(&randn(7, n, 1.0)), f64s(&randn(8, n, 1.0)));
    let analytic = reference::rope_backward(&dy, &inv_freq, dims, 5);
    let loss = |v: &[f64]| dot(&reference::rope_forward(v, &inv_freq, dims, 5), &dy);
    let numeric = finite_difference(loss, &x, 1e-4);
    assert_gradient("rope dx", &analytic, &numeric, 1e-7);
}

fn assert_rel(what: &str, got: f32, want: f64) {
    let err = ((f64::from(got) - want) / want).abs();
    assert!(
        err < 1e-7,
        "{what}: {got} vs {want} (relative error {err:.1e})"
    );
}

#[test]
fn rope_inv_freq_without_scaling_is_theta_to_the_minus_2i_over_d() {
    // 10000^(-2i/8) = 10^-i.
    let inv_freq = rope_inv_freq(8, 10_000.0, None);
    for (i, want) in [1.0, 0.1, 0.01, 0.001].into_iter().enumerate() {
        assert_rel(&format!("inv_freq[{i}]"), inv_freq[i], want);
    }
}

#[test]
fn rope_inv_freq_applies_llama3_scaling_in_each_regime() {
    // theta 500000, D = 128: inv = 500000^(-i/64), wavelen = 2π / inv. Thresholds: 8192/4 =
    // 2048 (below: unchanged) and 8192/1 = 8192 (above: inv / 8); in between, with
    // s = (8192 / wavelen − 1) / (4 − 1), inv · ((1 − s) / 8 + s).
    let inv_freq = rope_inv_freq(128, 500_000.0, Some(&LLAMA31));
    let cases = [
        // High frequency: wavelen 2π and 167.08, unchanged.
        (0, 1.0),
        (16, 0.037_606_030_930_863_93),
        // Medium: i = 32, inv = √2/1000, wavelen = 1000·√2·π = 4442.88, s = 0.281283;
        // i = 34, inv = 9.384739e-4, wavelen = 6695.11, s = 0.0745266.
        (32, 5.248_461_609_929_547e-4),
        (34, 1.785_078_127_679_964e-4),
        // Low frequency: wavelen 118142.8 and 2.56e6, divided by 8.
        (48, 6.647_869_871_181_235e-6),
        (63, 3.068_925_988_914_511e-7),
    ];
    for (i, want) in cases {
        assert_rel(&format!("llama3 inv_freq[{i}]"), inv_freq[i], want);
    }
}
