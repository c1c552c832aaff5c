use es2_wgpu::gpu::Tensor;
use es2_wgpu::ops::hook::{self, reference, ProjectMode, RowEdit};
use es2_wgpu::testing::*;
use es2_wgpu::Recorder;

const TOL: f64 = 1e-5;

/// 37 rows of 131 columns; 11 distinct ones selected out of order.
const ROWS: usize = 37;
const COLS: usize = 131;
const SELECTED: [u32; 11] = [36, 0, 5, 17, 2, 30, 6, 11, 23, 8, 29];

fn rows_tensor() -> Tensor {
    Tensor::from_u32(gpu(), [SELECTED.len()], &SELECTED).unwrap()
}

/// Runs `edit` on a fresh upload of `x` and returns the result.
fn edited(x: &[f32], value: &[f32], edit: impl Fn(&mut Recorder, &RowEdit)) -> Vec<f32> {
    let gpu = gpu();
    let tx = upload(gpu, [ROWS, COLS], x);
    let tv = upload(gpu, [value.len() / COLS, COLS], value);
    let rows = rows_tensor();
    let mut rec = Recorder::new(gpu);
    edit(
        &mut rec,
        &RowEdit {
            x: &tx,
            rows: &rows,
            value: &tv,
        },
    );
    rec.finish().unwrap();
    download(gpu, &tx)
}

#[test]
fn hook_add_and_replace_edit_only_the_selected_rows() {
    let x = randn(1, ROWS * COLS, 1.0);
    // A broadcast vector and one value row per selected row (value_rows = 11 and = 3 cycle).
    for value_rows in [1, 3, SELECTED.len()] {
        let v = randn(2 + value_rows as u64, value_rows * COLS, 1.0);
        let got = edited(&x, &v, |rec, e| hook::hook_add(rec, e, -0.625));
        let mut want = f64s(&x);
        reference::hook_add(&mut want, COLS, &SELECTED[..], &f64s(&v), -0.625);
        assert_close(
            &format!("hook_add value_rows={value_rows}"),
            &got,
            &want,
            TOL,
        );
    }
    // Replace, with value rows cycling (selected row i takes v[i % 3]).
    let v = randn(9, 3 * COLS, 1.0);
    let got = edited(&x, &v, hook::hook_replace);
    let mut want = f64s(&x);
    reference::hook_replace(&mut want, COLS, &SELECTED[..], &f64s(&v));
    assert_close("hook_replace", &got, &want, TOL);
}

#[test]
fn hook_project_exact_and_clamped_match_reference() {
    let x = randn(10, ROWS * COLS, 1.0);
    let w = randn(11, COLS, 0.3);
    for mode in [
        ProjectMode::Exact { bias: 0.0 },
        ProjectMode::Exact { bias: 0.75 },
        ProjectMode::ClampAbove {
            bias: -0.2,
            threshold: -1.5,
        },
    ] {
        let got = edited(&x, &w, |rec, e| hook::hook_project(rec, e, mode));
        let mut want = f64s(&x);
        reference::hook_project(&mut want, COLS, &SELECTED[..], &f64s(&w), mode);
        assert_close(&format!("hook_project {mode:?}"), &got, &want, TOL);
        if let ProjectMode::ClampAbove { bias, threshold } = mode {
            // Clamped rows land on the threshold; the others did not move.
            let (xd, wd) = (f64s(&x), f64s(&w));
            for &r in &SELECTED {
                let row = |v: &[f64]| v[r as usize * COLS..][..COLS].to_vec();
                let logit = |v: &[f64]| dot(&row(v), &wd) + f64::from(bias);
                let (before, after) = (logit(&xd), logit(&f64s(&got)));
                if before > f64::from(threshold) {
                    assert!(
                        (after - f64::from(threshold)).abs() < 1e-4,
                        "row {r}: {after}"
                    );
                } else {
                    assert!(
                        (after - before).abs() < 1e-5,
                        "row {r} moved: {before} -> {after}"
                    );
                }
            }
        }
    }
}

#[test]
fn hook_project_exact_is_its_own_gradient() {
    // x ↦ (I − wwᵀ/|w|²)x is symmetric: the gradient of g·P(x) is P(g), which the runner's
    // backward applies with the same kernel. Checked by central differences on one row.
    let cols = 29;
    let w = f64s(&randn(12, cols, 0.5));
    let g = f64s(&randn(13, cols, 1.0));
    let x0 = f64s(&randn(14, cols, 1.0));
    let project = |x: &[f64]| {
        let mut x = x.to_vec();
        reference::hook_project(&mut x, cols, &[0], &w, ProjectMode::Exact { bias: 0.0 });
        x
    };
    let numeric = finite_difference(|x| dot(&project(x), &g), &x0, 1e-4);
    assert_gradient("hook_project backward", &project(&g), &numeric, 1e-7);
    // And the GPU kernel applied to g gives that gradient.
    let gpu = gpu();
    let tg = upload(
        gpu,
        [1, cols],
        &g.iter().map(|&v| v as f32).collect::<Vec<_>>(),
    );
    let tw = upload(
        gpu,
        [1, cols],
        &w.iter().map(|&v| v as f32).collect::<Vec<_>>(),
    );
    let rows = Tensor::from_u32(gpu, [1], &[0]).unwrap();
    let mut rec = Recorder::new(gpu);
    let edit = RowEdit {
        x: &tg,
        rows: &rows,
        value: &tw,
    };
    hook::hook_project(&mut rec, &edit, ProjectMode::Exact { bias: 0.0 });
    rec.finish().unwrap();
    assert_close(
        "hook_project on a gradient",
        &download(gpu, &tg),
        &project(&g),
        TOL,
    );
}
