//! The gpu layer itself: the buffer pool, uploads and readbacks of every dtype, and the
//! recorder's guarantee that a tensor dropped after being recorded is not reused before the
//! submission.

use es2_wgpu::gpu::DType;
use es2_wgpu::ops::cast::cast;
use es2_wgpu::ops::residual::scale_forward;
use es2_wgpu::testing::*;
use es2_wgpu::{Recorder, Tensor};

#[test]
fn dropped_tensors_return_to_the_pool_and_are_reused() {
    // A device of its own: the shared one's pool is busy with the other tests.
    let gpu = &es2_wgpu::Gpu::new().expect("the pool test needs an adapter");
    let shape = [777, 13];
    let before = gpu.pooled_bytes();
    let t = Tensor::empty(gpu, shape, DType::F32);
    drop(t);
    let parked = gpu.pooled_bytes();
    assert!(
        parked > before,
        "a dropped tensor's buffer is parked in the pool"
    );
    let again = Tensor::empty(gpu, shape, DType::F32);
    assert!(gpu.pooled_bytes() < parked, "the parked buffer is reused");
    drop(again);
    gpu.trim_pool();
    assert_eq!(gpu.pooled_bytes(), 0, "trimming releases every idle buffer");
}

#[test]
fn every_dtype_round_trips_through_upload_and_readback() {
    let gpu = gpu();
    let ids: Vec<u32> = (0..37).map(|i| i * 7919).collect();
    assert_eq!(
        Tensor::from_u32(gpu, [37], &ids)
            .unwrap()
            .to_u32(gpu)
            .unwrap(),
        ids
    );
    let values = randn(3, 37, 2.0);
    let halves: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
    let brains: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let (h, b) = (
        Tensor::from_f16(gpu, [37], &halves).unwrap(),
        Tensor::from_bf16(gpu, [37], &brains).unwrap(),
    );
    let (hf, bf) = (poisoned(gpu, [37]), poisoned(gpu, [37]));
    let mut rec = Recorder::new(gpu);
    cast(&mut rec, &h, &hf);
    cast(&mut rec, &b, &bf);
    rec.finish().unwrap();
    let widened = |xs: Vec<f32>| xs.into_iter().map(f64::from).collect::<Vec<_>>();
    assert_close(
        "f16 upload",
        &download(gpu, &hf),
        &widened(halves.iter().map(|x| x.to_f32()).collect()),
        0.0,
    );
    assert_close(
        "bf16 upload",
        &download(gpu, &bf),
        &widened(brains.iter().map(|x| x.to_f32()).collect()),
        0.0,
    );
    let err = Tensor::from_f32(gpu, [4], &[1.0; 3])
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs 16 bytes, got 12"), "{err}");
    assert!(
        h.to_f32(gpu).is_err(),
        "reading f16 data as f32 is an error"
    );
}

#[test]
fn a_tensor_dropped_after_recording_is_not_overwritten_before_submission() {
    let gpu = gpu();
    let n = 4099;
    let x = randn(5, n, 1.0);
    let y = poisoned(gpu, [n]);
    let mut rec = Recorder::new(gpu);
    {
        let source = upload(gpu, [n], &x);
        scale_forward(&mut rec, &source, &y, 2.0);
    }
    // Without the recorder's hold on `source`, this upload could take its buffer and land
    // before the recorded scale runs.
    let _other = upload(gpu, [n], &vec![-1.0; n]);
    rec.finish().unwrap();
    let want: Vec<f64> = x.iter().map(|&v| 2.0 * f64::from(v)).collect();
    assert_close("scale of a dropped input", &download(gpu, &y), &want, 0.0);
}

/// Dispatches are queued until their pass ends (their pipelines may still be compiling on
/// other threads), so copies and clears recorded between them must still see them in
/// recording order.
#[test]
fn copies_and_clears_run_in_recording_order_between_queued_dispatches() {
    // A fresh device, so that the kernels' pipelines are still compiling when recorded.
    let gpu = &own_device();
    let n = 1031;
    let x = randn(9, n, 1.0);
    let source = upload(gpu, [n], &x);
    let [doubled, copied, sextupled, cleared_then_read, tail] = [0; 5].map(|_| poisoned(gpu, [n]));
    let mut rec = Recorder::new(gpu);
    scale_forward(&mut rec, &source, &doubled, 2.0);
    rec.copy(&doubled, &copied);
    scale_forward(&mut rec, &copied, &sextupled, 3.0);
    rec.copy_elements(&sextupled, 1, &tail, 0, n - 1);
    // Written again just before the clear: the clear must land after it.
    scale_forward(&mut rec, &source, &doubled, 2.0);
    rec.zero(&doubled);
    scale_forward(&mut rec, &doubled, &cleared_then_read, 1.0);
    rec.finish().unwrap();
    // In f32 as the kernels compute it (2·x is exact, 3·(2·x) rounds once).
    let times = |k: f32| {
        x.iter()
            .map(|&v| f64::from(k * (2.0 * v)))
            .collect::<Vec<_>>()
    };
    assert_close(
        "a copy after a dispatch",
        &download(gpu, &copied),
        &times(1.0),
        0.0,
    );
    assert_close(
        "a dispatch after a copy",
        &download(gpu, &sextupled),
        &times(3.0),
        0.0,
    );
    assert_close(
        "copy_elements after a dispatch",
        &download(gpu, &tail)[..n - 1],
        &times(3.0)[1..],
        0.0,
    );
    assert_close(
        "a clear after a dispatch",
        &download(gpu, &doubled),
        &vec![0.0; n],
        0.0,
    );
    assert_close(
        "a dispatch after a clear",
        &download(gpu, &cleared_then_read),
        &vec![0.0; n],
        0.0,
    );
}

/// A device of its own: a fault is reported on the device where it happened, and the shared
/// test device must not see this one's.
fn own_device() -> es2_wgpu::Gpu {
    es2_wgpu::Gpu::new().expect("the fault tests need an adapter")
}

#[test]
fn a_binding_past_the_adapter_limit_is_an_error_not_a_panic() {
    use es2_wgpu::ops::matmul::{matmul_forward, MatmulOptions};
    use es2_wgpu::{DeviceFault, Error};
    let gpu = &own_device();
    // A weight [n, k] one row longer than one storage binding holds, as an LM head with a large
    // vocabulary is: the product binds all of it.
    let k = 1024;
    let n = (gpu.max_binding_bytes() as usize / (4 * k)) + 1;
    let x = upload(gpu, [2, k], &randn(1, 2 * k, 1.0));
    let w = Tensor::empty(gpu, [n, k], DType::F32);
    let y = Tensor::empty(gpu, [2, n], DType::F32);
    let mut rec = Recorder::new(gpu);
    matmul_forward(&mut rec, &x, &w, None, &y, MatmulOptions::overwrite());
    match rec.finish() {
        Err(Error::Device { kind, message }) => {
            assert_eq!(kind, DeviceFault::Validation, "{message}");
            assert!(message.contains("binding"), "{message}");
        }
        other => panic!("expected a validation error, got {other:?}"),
    }
    // The fault was reported once; the device takes new work.
    let small = upload(gpu, [4], &[1.0, 2.0, 3.0, 4.0]);
    let out = poisoned(gpu, [4]);
    let mut rec = Recorder::new(gpu);
    scale_forward(&mut rec, &small, &out, 2.0);
    rec.finish().unwrap();
    assert_eq!(download(gpu, &out), vec![2.0, 4.0, 6.0, 8.0]);
}

#[test]
fn a_buffer_past_the_adapter_limit_is_an_error_not_a_panic() {
    use es2_wgpu::Error;
    let gpu = &own_device();
    let too_many = (gpu.limits().max_buffer_size / 4) as usize + 64;
    let huge = Tensor::empty(gpu, [too_many], DType::F32);
    let mut rec = Recorder::new(gpu);
    rec.zero(&huge);
    match rec.finish() {
        Err(Error::Device { message, .. }) => eprintln!("reported: {message}"),
        other => panic!("expected a device fault, got {other:?}"),
    }
}
