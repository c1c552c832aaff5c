//! Decoding ids whose bytes are not (yet) valid UTF-8: `Tokenizer::decode` gives transformers'
//! text and the streaming decoder never fails, holds back what may still change, and adds up
//! to the same text. References: `scripts/make_decode_fixtures.py`.

use std::path::PathBuf;

use es2_wgpu::model::Config;
use es2_wgpu::text::Tokenizer;
use serde_json::Value;

use crate::fixtures::fixtures;

struct Case {
    name: String,
    ids: Vec<u32>,
    text: String,
}

/// Each tokenizer of the fixture with its cases.
fn references() -> Vec<(String, Tokenizer, Vec<Case>)> {
    let path = fixtures().join("decode.reference.json");
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    refs["tokenizers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, t)| {
            let dir = root.join(t["tokenizer"].as_str().unwrap());
            let config = Config::from_file(&dir.join("config.json")).unwrap();
            let tok = Tokenizer::from_dir(&dir, &config.eos_token_ids).unwrap();
            let cases = t["cases"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| Case {
                    name: c["name"].as_str().unwrap().to_owned(),
                    ids: serde_json::from_value(c["ids"].clone()).unwrap(),
                    text: c["text"].as_str().unwrap().to_owned(),
                })
                .collect();
            (name.clone(), tok, cases)
        })
        .collect()
}

/// What a stream gives for each id, and at the end.
fn stream(tok: &Tokenizer, ids: &[u32]) -> (Vec<Option<String>>, String) {
    let mut stream = tok.stream();
    let pieces = ids.iter().map(|&id| stream.step(id)).collect();
    (pieces, stream.finish())
}

fn joined(pieces: &[Option<String>], rest: &str) -> String {
    pieces
        .iter()
        .flatten()
        .map(String::as_str)
        .collect::<String>()
        + rest
}

#[test]
fn decode_matches_transformers_on_cut_invalid_and_completed_bytes() {
    let mut checked = 0;
    for (name, tok, cases) in references() {
        for case in &cases {
            let got = tok.decode(&case.ids).unwrap();
            assert_eq!(got, case.text, "{name}: {} {:?}", case.name, case.ids);
            checked += 1;
        }
    }
    assert!(checked > 250, "only {checked} sequences");
}

#[test]
fn stream_adds_up_to_the_decoded_text_at_every_cut() {
    let mut replaced = 0;
    for (name, tok, cases) in references() {
        for case in &cases {
            // Generation may stop after any token: every prefix is a sequence of its own.
            for end in 1..=case.ids.len() {
                let ids = &case.ids[..end];
                let (pieces, rest) = stream(&tok, ids);
                let want = tok.decode(ids).unwrap();
                assert_eq!(
                    joined(&pieces, &rest),
                    want,
                    "{name}: {} cut after {end} ids {ids:?}: {pieces:?} + {rest:?}",
                    case.name
                );
                assert!(
                    pieces.iter().flatten().all(|p| !p.is_empty()),
                    "{name}: an empty piece"
                );
            }
            replaced += usize::from(case.text.contains('\u{FFFD}'));
        }
    }
    assert!(
        replaced > 100,
        "only {replaced} sequences hold invalid bytes"
    );
}

fn case<'a>(cases: &'a [Case], name: &str) -> &'a Case {
    cases.iter().find(|c| c.name == name).unwrap()
}

#[test]
fn stream_holds_back_a_run_of_byte_tokens_that_may_still_break() {
    let refs = references();
    let (_, stories, cases) = refs.iter().find(|(n, ..)| n == "stories260K").unwrap();
    // "α" then the first byte of another "α": transformers turns the whole run of byte
    // tokens into U+FFFD once a word ends it, so "α" must not be shown early. (The old
    // stream showed it and then failed with "Invalid prefix encountered".)
    let c = case(cases, "valid character then a cut one, then a word");
    let (pieces, rest) = stream(stories, &c.ids);
    assert_eq!(pieces[..3], [None, None, None]);
    assert_eq!(pieces[3].as_deref(), Some(c.text.as_str()));
    assert_eq!(rest, "");
    // A run ended by generation stopping comes out at the end, replaced the same way.
    let c = case(cases, "valid character then a cut one at the end");
    let (pieces, rest) = stream(stories, &c.ids);
    assert!(pieces.iter().all(Option::is_none));
    assert_eq!(rest, c.text);
    // A special token (skipped by decoding) does not end the run: its bytes still join.
    let c = case(cases, "special token inside a character");
    let (pieces, rest) = stream(stories, &c.ids);
    assert!(pieces.iter().all(Option::is_none));
    assert_eq!((rest.as_str(), c.text.as_str()), ("α", "α"));
}

#[test]
fn byte_level_stream_shows_a_character_once_its_last_byte_arrives() {
    let refs = references();
    let (_, qwen, cases) = refs.iter().find(|(n, ..)| n == "qwen2-f16").unwrap();
    let c = case(cases, "three-byte character completed later");
    let (pieces, rest) = stream(qwen, &c.ids);
    let pieces: Vec<Option<&str>> = pieces.iter().map(Option::as_deref).collect();
    assert_eq!(pieces, [Some(" the"), None, None, Some("中"), Some(" the")]);
    assert_eq!(rest, "");
    // A cut character followed by a word: one U+FFFD, shown with the word.
    let c = case(cases, "cut character then a word");
    let (pieces, _) = stream(qwen, &c.ids);
    assert_eq!(pieces, [None, Some(c.text.clone())]);
}
