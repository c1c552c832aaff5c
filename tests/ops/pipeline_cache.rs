//! wgpu's pipeline cache on disk: a device writes what it compiled to its cache folder, a
//! second device starts from that file, and a damaged file is an empty cache, never an error.

use es2_wgpu::gpu::{Gpu, GpuOptions, PipelineCacheDir, Recorder};
use es2_wgpu::ops::residual::accumulate;
use es2_wgpu::testing::{download, scratch_dir, upload};

fn device_caching_in(dir: &std::path::Path) -> Gpu {
    Gpu::with_options(&GpuOptions {
        pipeline_cache: PipelineCacheDir::At(dir.to_path_buf()),
        ..GpuOptions::default()
    })
    .unwrap()
}

/// Compiles and runs one kernel: acc = [1, 2, 3] + 2·[4, 5, 6].
fn run_a_kernel(gpu: &Gpu) {
    let x = upload(gpu, [3], &[4.0, 5.0, 6.0]);
    let acc = upload(gpu, [3], &[1.0, 2.0, 3.0]);
    let mut rec = Recorder::new(gpu);
    accumulate(&mut rec, &x, &acc, 2.0);
    rec.finish().unwrap();
    assert_eq!(download(gpu, &acc), [9.0, 12.0, 15.0]);
}

#[test]
fn pipelines_are_cached_on_disk_between_devices() {
    let dir = scratch_dir("pipeline-cache", "round-trip");
    let gpu = device_caching_in(&dir);
    if !gpu.features().contains(wgpu::Features::PIPELINE_CACHE) {
        // Only Vulkan adapters offer it; lavapipe, which CI runs, does.
        assert_ne!(
            gpu.info().backend,
            wgpu::Backend::Vulkan,
            "{:?}",
            gpu.info()
        );
        assert_eq!(gpu.pipeline_cache_file(), None);
        return;
    }
    let file = gpu.pipeline_cache_file().unwrap().to_path_buf();
    assert!(file.starts_with(&dir), "{file:?}");
    run_a_kernel(&gpu);
    assert_eq!(gpu.save_pipeline_cache().unwrap(), Some(file.as_path()));
    let written = std::fs::read(&file).unwrap();
    assert!(!written.is_empty());
    // Nothing new compiled: nothing to write.
    assert_eq!(gpu.save_pipeline_cache().unwrap(), None);
    drop(gpu);

    // A second device starts from the file and computes the same.
    let again = device_caching_in(&dir);
    assert_eq!(again.pipeline_cache_file(), Some(file.as_path()));
    run_a_kernel(&again);
    drop(again);

    // A damaged file is an empty cache: the device works and writes a good one over it.
    std::fs::write(&file, b"not a pipeline cache").unwrap();
    let damaged = device_caching_in(&dir);
    run_a_kernel(&damaged);
    assert_eq!(damaged.save_pipeline_cache().unwrap(), Some(file.as_path()));
    assert_ne!(std::fs::read(&file).unwrap(), b"not a pipeline cache");
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [file.file_name().unwrap()], "{names:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_cache_is_read_or_written_when_turned_off() {
    let gpu = Gpu::with_options(&GpuOptions {
        pipeline_cache: PipelineCacheDir::Off,
        ..GpuOptions::default()
    })
    .unwrap();
    assert_eq!(gpu.pipeline_cache_file(), None);
    run_a_kernel(&gpu);
    assert_eq!(gpu.save_pipeline_cache().unwrap(), None);
}

#[test]
fn devices_saving_one_cache_at_once_leave_one_whole_file() {
    let dir = scratch_dir("pipeline-cache", "concurrent");
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let gpu = device_caching_in(&dir);
                run_a_kernel(&gpu);
                gpu.save_pipeline_cache().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let gpu = device_caching_in(&dir);
    match gpu.pipeline_cache_file() {
        // One cache file, no temporary ones, and a device starts from it.
        Some(file) => assert_eq!(names, [file.file_name().unwrap()], "{names:?}"),
        None => assert!(names.is_empty(), "{names:?}"),
    }
    run_a_kernel(&gpu);
    let _ = std::fs::remove_dir_all(&dir);
}
