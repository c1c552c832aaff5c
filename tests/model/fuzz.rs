//! Seeded mutation fuzzing, on stable Rust with no extra crate, of the readers of user files:
//! the safetensors header reader, config.json, prompt datasets and LoRA adapters. Each target
//! starts from valid files and reads mutated copies (bit flips, interesting bytes and JSON
//! tokens spliced in, spans cut or repeated, JSON values swapped for extreme ones, the header
//! length lied about); an input may be accepted or refused, but never panic.
//!
//! `ES2_FUZZ_ITERS` inputs per target (default 300, a few seconds in all), from seed
//! `ES2_FUZZ_SEED` (default 1); `scripts/fuzz.sh N` runs a longer campaign. A panic fails the
//! test, names the target, seed and input number, and keeps the input in the temp folder, to
//! be replayed and turned into a regression test.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use es2_wgpu::model::{
    read_adapter_config, Checkpoint, Config, LoadOptions, LoraConfig, Projection, Transformer,
};
use es2_wgpu::rng::Rng;
use es2_wgpu::testing::gpu;
use es2_wgpu::text::load_prompts;
use serde_json::Value;

use crate::fixtures::{model_dir, MODELS};

fn budget() -> (usize, u64) {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    (var("ES2_FUZZ_ITERS", 300) as usize, var("ES2_FUZZ_SEED", 1))
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("es2-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const BYTES: [u8; 14] = [
    0, 0xFF, 0x80, 0xC3, b'"', b'{', b'}', b'[', b']', b',', b':', b'-', b'9', b'\n',
];

const TOKENS: [&str; 16] = [
    "-1",
    "0",
    "1e309",
    "18446744073709551616",
    "4294967296",
    "null",
    "[]",
    "{}",
    "\"x\"",
    ",",
    ":",
    "\"",
    "\\u0000",
    "\u{FFFD}",
    "\"\"\"",
    "\r\n",
];

/// JSON values at the edges of what a field may hold.
fn interesting_value(rng: &mut Rng) -> Value {
    let values = [
        "0",
        "-1",
        "1",
        "2",
        "3",
        "8",
        "255",
        "65536",
        "4294967295",
        "4294967296",
        "18446744073709551615",
        "1e308",
        "-1e308",
        "0.5",
        "-0.0",
        "\"\"",
        "\"x\"",
        "\"F32\"",
        "\"I64\"",
        "\"llama3\"",
        "\"LORA\"",
        "\"q_proj\"",
        "null",
        "true",
        "false",
        "[]",
        "{}",
        "[1, 2]",
        "[0, 18446744073709551615]",
        "[4294967296, 4294967296]",
        "{\"rope_type\": \"llama3\"}",
    ];
    serde_json::from_str(values[rng.below(values.len())]).unwrap()
}

/// Every node of a JSON document, as a path of keys and indices.
fn paths(v: &Value, at: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    out.push(at.clone());
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                at.push(Value::from(k.as_str()));
                paths(child, at, out);
                at.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                at.push(Value::from(i));
                paths(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn node<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, key| match key {
        Value::String(k) => &mut v[k.as_str()],
        _ => &mut v[key.as_u64().unwrap() as usize],
    })
}

/// Changes one node of a JSON document: a new value, removed, or (at the top) a key listed
/// twice.
fn mutate_json(rng: &mut Rng, text: &[u8]) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(text).ok()?;
    let mut all = Vec::new();
    paths(&v, &mut Vec::new(), &mut all);
    let path = all[rng.below(all.len())].clone();
    match rng.below(4) {
        0 | 1 => *node(&mut v, &path) = interesting_value(rng),
        2 if !path.is_empty() => {
            let (last, parent) = path.split_last().unwrap();
            match (node(&mut v, parent), last) {
                (Value::Object(map), Value::String(k)) => {
                    map.remove(k);
                }
                (Value::Array(items), i) => {
                    items.remove(i.as_u64().unwrap() as usize);
                }
                _ => {}
            }
        }
        _ => {
            // A top-level key listed twice, with another value the second time.
            let text = v.to_string();
            let (key, _) = v.as_object()?.iter().next()?;
            let entry = format!("{}:{},", Value::from(key.as_str()), interesting_value(rng));
            return Some(format!("{{{entry}{}", &text[1..]).into_bytes());
        }
    }
    Some(v.to_string().into_bytes())
}

/// One to four random edits of `input`.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if at < out.len() => out[at] ^= 1 << rng.below(8),
            1 if at < out.len() => out[at] = BYTES[rng.below(BYTES.len())],
            2 => {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                out.splice(at..at, token.iter().copied());
            }
            3 => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            4 => {
                let end = (at + 1 + rng.below(32)).min(out.len());
                let span = out[at.min(end)..end].to_vec();
                out.splice(at..at, span);
            }
            5 => out.truncate(at),
            _ => {
                if let Some(json) = mutate_json(rng, &out) {
                    out = json;
                }
            }
        }
    }
    out
}

/// A safetensors file with its header edited: the JSON mutated, the length prefix lied
/// about, or the data cut or extended.
fn mutate_safetensors(rng: &mut Rng, file: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let (header, data) = (&file[8..8 + n], &file[8 + n..]);
    let mut header = header.to_vec();
    let mut data = data.to_vec();
    match rng.below(4) {
        0 => data.truncate(rng.below(data.len() + 1)),
        1 => data.extend(std::iter::repeat_n(0x7F, 1 + rng.below(64))),
        _ => header = mutate(rng, &header),
    }
    let mut len = header.len() as u64;
    if rng.below(5) == 0 {
        let lies = [
            0,
            1,
            7,
            len.saturating_sub(1),
            len + 1,
            file.len() as u64,
            100_000_001,
            u64::MAX,
        ];
        len = lies[rng.below(lies.len())];
    }
    let mut out = len.to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    if rng.below(10) == 0 {
        out.truncate(rng.below(out.len()));
    }
    out
}

/// What fuzzing one target found.
#[derive(Default)]
struct Tally {
    accepted: usize,
    refused: usize,
    crashes: Vec<String>,
}

/// Feeds `iters` mutants of the seeds to `target`, catching panics.
fn campaign(
    name: &str,
    seeds: &[Vec<u8>],
    mutant: impl Fn(&mut Rng, &[u8]) -> Vec<u8>,
    mut target: impl FnMut(&[u8]) -> bool,
) -> Tally {
    let (iters, seed) = budget();
    let mut rng = Rng::new(seed ^ name.len() as u64);
    let mut tally = Tally::default();
    for i in 0..iters {
        let input = mutant(&mut rng, &seeds[i % seeds.len()]);
        match catch_unwind(AssertUnwindSafe(|| target(&input))) {
            Ok(true) => tally.accepted += 1,
            Ok(false) => tally.refused += 1,
            Err(_) => {
                let kept = std::env::temp_dir().join(format!("es2-fuzz-crash-{name}-{seed}-{i}"));
                std::fs::write(&kept, &input).unwrap();
                tally
                    .crashes
                    .push(format!("{name} seed {seed} input {i}: {}", kept.display()));
            }
        }
    }
    eprintln!(
        "fuzz {name}: {iters} inputs (seed {seed}): {} accepted, {} refused, {} crashes",
        tally.accepted,
        tally.refused,
        tally.crashes.len()
    );
    tally
}

/// No crash, and inputs both accepted and refused (a campaign that only ever sees broken or
/// only ever sees valid inputs tests little).
fn assert_sound(tally: Tally) {
    assert!(tally.crashes.is_empty(), "panics: {:#?}", tally.crashes);
    assert!(
        tally.accepted > 0 && tally.refused > 0,
        "one-sided campaign"
    );
}

/// Reads every tensor of a checkpoint as f32 (an integer one is refused, as it should be).
fn read_all(checkpoint: &Checkpoint) {
    for name in checkpoint.names() {
        let shape = checkpoint.shape(name).unwrap().to_vec();
        let _ = checkpoint.load_f32(name, &shape);
    }
}

#[test]
fn fuzz_safetensors_header_reader() {
    let dir = scratch("safetensors");
    let path = dir.join("x.safetensors");
    let seeds = vec![
        std::fs::read(model_dir("llama3-rope-bias").join("model.safetensors")).unwrap(),
        small_safetensors(),
    ];
    let tally = campaign("safetensors", &seeds, mutate_safetensors, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        Checkpoint::open_file(&path).map(|c| read_all(&c)).is_ok()
    });
    std::fs::remove_dir_all(dir).unwrap();
    assert_sound(tally);
}

/// Tensors of every float dtype, an integer one, a scalar and an empty one.
fn small_safetensors() -> Vec<u8> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let data = [0x3Cu8; 64];
    let views = vec![
        (
            "a",
            TensorView::new(Dtype::F32, vec![3, 5], &data[..60]).unwrap(),
        ),
        (
            "b",
            TensorView::new(Dtype::F16, vec![7], &data[..14]).unwrap(),
        ),
        (
            "c",
            TensorView::new(Dtype::BF16, vec![2, 2, 2], &data[..16]).unwrap(),
        ),
        (
            "d",
            TensorView::new(Dtype::I32, vec![4], &data[..16]).unwrap(),
        ),
        (
            "e",
            TensorView::new(Dtype::F32, vec![], &data[..4]).unwrap(),
        ),
        (
            "f",
            TensorView::new(Dtype::F32, vec![0, 3], &data[..0]).unwrap(),
        ),
    ];
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn fuzz_config_parsing() {
    let seeds: Vec<Vec<u8>> = MODELS
        .iter()
        .map(|m| std::fs::read(model_dir(m).join("config.json")).unwrap())
        .collect();
    let tally = campaign("config", &seeds, mutate, |bytes| {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return false;
        };
        let Ok(config) = Config::from_json(text) else {
            return false;
        };
        // What is computed from a config that was accepted must not overflow.
        let _ = (config.parameter_count(), config.q_dim(), config.kv_dim());
        Config::from_json(&config.to_hf_json().to_string()).is_ok()
    });
    assert_sound(tally);
}

#[test]
fn fuzz_dataset_parsing() {
    let dir = scratch("datasets");
    let seeds = [
        (
            "json",
            r#"[{"instruction": "a, b", "x": 1}, {"goal": "é 世界"}, "plain"]"#,
        ),
        (
            "jsonl",
            "{\"prompt\": \"p1\"}\n\n\"p2\"\n{\"behavior\": \"b\\n c\"}\n",
        ),
        (
            "csv",
            "goal,target\n\"Write, \"\"then\"\" stop\",Sure\nsecond,x\n\"multi\nline\",y\n",
        ),
    ];
    // The extension picks the parser: keep it in the seed's first byte.
    let seed_bytes: Vec<Vec<u8>> = seeds
        .iter()
        .enumerate()
        .map(|(i, (_, text))| [&[i as u8][..], text.as_bytes()].concat())
        .collect();
    let mutant = |rng: &mut Rng, seed: &[u8]| [&seed[..1], &mutate(rng, &seed[1..])[..]].concat();
    let tally = campaign("dataset", &seed_bytes, mutant, |bytes| {
        let path = dir.join(format!("d.{}", seeds[bytes[0] as usize].0));
        std::fs::write(&path, &bytes[1..]).unwrap();
        load_prompts(&path).is_ok()
    });
    std::fs::remove_dir_all(dir).unwrap();
    assert_sound(tally);
}

#[test]
fn fuzz_adapter_loading() {
    let dir = scratch("adapter");
    let base = Transformer::load(gpu(), &model_dir("llama-f32"), &LoadOptions::default()).unwrap();
    let mut model = base;
    let config = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec![Projection::Q, Projection::V],
    };
    model.attach_lora(gpu(), &config, 3).unwrap();
    model
        .save_adapter(gpu(), &dir, &config, "llama-f32")
        .unwrap();
    let weights = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let adapter_config = std::fs::read(dir.join("adapter_config.json")).unwrap();
    // The first byte says which file a mutant replaces.
    let seeds = vec![
        [&[0u8][..], &adapter_config].concat(),
        [&[1u8][..], &weights].concat(),
    ];
    let mutant = |rng: &mut Rng, seed: &[u8]| {
        let body = if seed[0] == 0 {
            mutate(rng, &seed[1..])
        } else {
            mutate_safetensors(rng, &seed[1..])
        };
        [&seed[..1], &body[..]].concat()
    };
    let tally = campaign("adapter", &seeds, mutant, |bytes| {
        let (config_bytes, weight_bytes) = match bytes[0] {
            0 => (&bytes[1..], &weights[..]),
            _ => (&adapter_config[..], &bytes[1..]),
        };
        std::fs::write(dir.join("adapter_config.json"), config_bytes).unwrap();
        std::fs::write(dir.join("adapter_model.safetensors"), weight_bytes).unwrap();
        read_adapter_config(&dir).is_ok() && model.load_adapter(gpu(), &dir).is_ok()
    });
    std::fs::remove_dir_all(dir).unwrap();
    assert_sound(tally);
}
