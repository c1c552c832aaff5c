use es2_wgpu::model::Config;
use es2_wgpu::text::Tokenizer;
use serde_json::Value;

use crate::fixtures::{fixtures, model_dir, MODELS};

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenisation_matches_transformers_plain_and_chat() {
    let mut chat_checked = 0;
    for name in MODELS {
        let dir = model_dir(name);
        let config = Config::from_file(&dir.join("config.json")).unwrap();
        let tok = Tokenizer::from_dir(&dir, &config.eos_token_ids).unwrap();
        let refs: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("{name}.reference.json"))).unwrap(),
        )
        .unwrap();
        for entry in refs["tokenization"].as_array().unwrap() {
            let prompt = entry["prompt"].as_str().unwrap();
            assert_eq!(
                tok.encode(prompt).unwrap(),
                ids(&entry["plain_ids"]),
                "{name}: {prompt:?}"
            );
            if let Some(chat) = entry.get("chat_ids") {
                let text = tok
                    .render_chat(&[es2_wgpu::text::Message::user(prompt)], true)
                    .unwrap();
                assert_eq!(
                    text,
                    entry["chat_text"].as_str().unwrap(),
                    "{name} template"
                );
                assert_eq!(
                    tok.encode_prompt(prompt, true).unwrap(),
                    ids(chat),
                    "{name} chat ids"
                );
                chat_checked += 1;
            } else {
                assert!(!tok.has_chat_template());
            }
        }
    }
    assert_eq!(chat_checked, 6, "two chat models x three prompts");
}

#[test]
fn stories260k_tokenizer_adds_bos_like_transformers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/stories260K");
    let tok = Tokenizer::from_dir(&dir, &[2]).unwrap();
    // SOURCES.md: ids [1, 403, 407, 261, 378] for "Once upon a time".
    assert_eq!(
        tok.encode("Once upon a time").unwrap(),
        vec![1, 403, 407, 261, 378]
    );
    assert_eq!(tok.eos_ids(), &[2]);
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let dir = std::env::temp_dir().join("es2-no-tokenizer");
    std::fs::create_dir_all(&dir).unwrap();
    let err = Tokenizer::from_dir(&dir, &[]).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("missing"),
        "{err}"
    );
    // It says what to do about it.
    assert!(err.contains("save_pretrained"), "{err}");
}
