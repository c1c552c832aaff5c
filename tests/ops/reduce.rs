use es2_wgpu::ops::reduce::{self, reference};
use es2_wgpu::ops::Write;
use es2_wgpu::testing::*;
use es2_wgpu::Recorder;

#[test]
fn sum_rows_matches_reference_in_one_and_two_stages() {
    let gpu = gpu();
    // (rows, cols): one row; fewer rows than a stage; many rows (two stages), odd columns.
    for (seed, rows, cols) in [(1u64, 1usize, 7usize), (2, 37, 1), (3, 1001, 333)] {
        let x = randn(seed, rows * cols, 1.0);
        let init = randn(seed + 50, cols, 1.0);
        let tx = upload(gpu, [rows, cols], &x);
        let out = poisoned(gpu, [cols]);
        let acc = upload(gpu, [cols], &init);
        let mut rec = Recorder::new(gpu);
        reduce::sum_rows(&mut rec, &tx, &out, Write::Overwrite);
        reduce::sum_rows(&mut rec, &tx, &acc, Write::Accumulate);
        rec.finish().unwrap();
        let want = reference::sum_rows(&f64s(&x), cols);
        let name = format!("sum_rows {rows}x{cols}");
        assert_close(&name, &download(gpu, &out), &want, 1e-5);
        assert_close_accumulated(&name, &download(gpu, &acc), &init, &want, 1e-5);
    }
}

#[test]
fn sum_rows_is_bit_identical_across_runs() {
    let gpu = gpu();
    let (rows, cols) = (777, 65);
    let tx = upload(gpu, [rows, cols], &randn(9, rows * cols, 3.0));
    let run = || {
        let out = poisoned(gpu, [cols]);
        let mut rec = Recorder::new(gpu);
        reduce::sum_rows(&mut rec, &tx, &out, Write::Overwrite);
        rec.finish().unwrap();
        download(gpu, &out)
    };
    assert_bit_identical("sum_rows", &run(), &run());
}
