//! The embedded models. `tiny-llama` loads with no files, its weights are deterministic and its
//! logits usable, its chat template renders, and its byte-level tokenizer takes any text.
//! `tiny-chat` (the default) is exactly the folder `models/tiny-chat`.

use std::path::PathBuf;

use es2_wgpu::model::{embedded, open_model, LoadOptions, Transformer};
use es2_wgpu::testing::gpu;
use es2_wgpu::text::{Message, Tokenizer};

use crate::sequence_logits;

fn tiny() -> (Transformer, Tokenizer) {
    open_model(gpu(), embedded::TINY_LLAMA, &LoadOptions::default()).unwrap()
}

fn std_dev(v: &[f32]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    (v.iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt()
}

#[test]
fn tiny_llama_logits_are_finite_varied_and_identical_across_loads() {
    let (model, tok) = tiny();
    assert_eq!(model.config.vocab_size, tok.vocab_size());
    assert_eq!((model.layers(), model.config.intermediate_size), (4, 172));
    let ids = tok.encode("The quick brown fox").unwrap();
    let first = sequence_logits(&model, &ids);
    assert!(first.iter().all(|x| x.is_finite()));
    let v = model.config.vocab_size;
    let rows: Vec<&[f32]> = first.chunks(v).collect();
    for row in &rows {
        // N(0, 0.02²) weights over a unit-RMS hidden state of width 64: about 0.16.
        let s = std_dev(row);
        assert!((0.05..1.0).contains(&s), "logit spread {s}");
    }
    assert_ne!(
        rows[0],
        rows[rows.len() - 1],
        "positions give different logits"
    );
    let (again, _) = tiny();
    let second = sequence_logits(&again, &ids);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&first), bits(&second), "two loads differ");
}

#[test]
fn tiny_llama_chat_template_renders_chatml() {
    let (_, tok) = tiny();
    let text = tok.render_chat(&[Message::user("hi")], true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode_prompt("hi", true).unwrap();
    assert_eq!(ids[0], 257, "<|im_start|> is one special token");
    assert_eq!(ids.iter().filter(|&&id| id == 258).count(), 1);
    assert_eq!(tok.eos_ids(), &[258]);
    assert_eq!(tok.decode(&ids).unwrap(), "user\nhi\nassistant\n");
}

#[test]
fn byte_level_tokenizer_round_trips_any_utf8() {
    let (_, tok) = tiny();
    for text in [
        "héllo 世界",
        "  leading spaces, tabs\tand\nnewlines\r\n",
        "emoji 🦀🦀 and a NUL \u{0} and ÿ",
        "<|im_end|>",
    ] {
        let ids = tok.encode(text).unwrap();
        if text.starts_with("<|") {
            assert_eq!(ids, vec![258]);
            continue;
        }
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, bytes, "one token per byte for {text:?}");
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
}

#[test]
fn text_stream_holds_back_partial_characters() {
    let (_, tok) = tiny();
    let mut stream = tok.stream();
    let pieces: Vec<Option<String>> = "世!".bytes().map(|b| stream.step(u32::from(b))).collect();
    assert_eq!(
        pieces,
        vec![None, None, Some("世".to_string()), Some("!".to_string())]
    );
    // The end-of-turn token is special: it adds no text.
    assert_eq!(stream.step(258), None);
    // A character cut off by the end of generation comes out lossily.
    assert_eq!(stream.step(0xE4), None);
    assert_eq!(stream.finish(), "\u{FFFD}");
}

/// Writes embedded model `name` as a folder and checks that it loads with the same tokens and
/// logits as the built-in model.
fn written_as_a_folder_loads_identically(name: &str) {
    let gpu = gpu();
    let dir = std::env::temp_dir().join(format!("es2-wgpu-{}-{name}", std::process::id()));
    let model = embedded::find(name).unwrap();
    model.write_hf_folder(gpu, &dir).unwrap();
    let (from_folder, folder_tok) =
        open_model(gpu, dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let (built_in, tok) = open_model(gpu, name, &LoadOptions::default()).unwrap();
    let ids = tok.encode_prompt("héllo", true).unwrap();
    assert_eq!(folder_tok.encode_prompt("héllo", true).unwrap(), ids);
    assert_eq!(folder_tok.eos_ids(), tok.eos_ids());
    let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(sequence_logits(&from_folder, &ids)),
        bits(sequence_logits(&built_in, &ids))
    );
}

#[test]
fn tiny_llama_written_as_a_folder_loads_identically() {
    written_as_a_folder_loads_identically(embedded::TINY_LLAMA);
}

#[test]
fn tiny_chat_written_as_a_folder_loads_identically() {
    written_as_a_folder_loads_identically(embedded::TINY_CHAT);
}

#[test]
fn tiny_chat_is_the_default_and_the_committed_folder() {
    assert_eq!(embedded::DEFAULT, embedded::TINY_CHAT);
    let gpu = gpu();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-chat");
    let (folder, folder_tok) =
        open_model(gpu, dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let (built_in, tok) = open_model(gpu, embedded::DEFAULT, &LoadOptions::default()).unwrap();
    let text = tok.render_chat(&[Message::user("Hi")], true).unwrap();
    assert_eq!(text, "<s>User: Hi\nAssistant:");
    let ids = tok
        .encode_prompt("Write a poem about the sea", true)
        .unwrap();
    assert_eq!(
        folder_tok
            .encode_prompt("Write a poem about the sea", true)
            .unwrap(),
        ids
    );
    assert_eq!((tok.eos_ids(), folder_tok.eos_ids()), (&[2][..], &[2][..]));
    let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(sequence_logits(&folder, &ids)),
        bits(sequence_logits(&built_in, &ids))
    );
}
