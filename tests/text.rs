//! Tokenizers, chat templates, stop ids and streaming, checked against expected.json.

mod common;

use common::*;
use plait::model::{TextTokenizer, TokenizerConfig};

fn tokenizer(name: &str) -> TextTokenizer {
    let dir = fixture(name);
    let config = TokenizerConfig::from_dir(&dir).unwrap();
    TextTokenizer::from_dir(&dir, &config).unwrap().unwrap()
}

#[test]
fn every_tokenize_case_gives_the_expected_ids_and_round_trips() {
    for name in FIXTURES {
        let tok = tokenizer(name);
        for case in expected(name)["tokenize"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let got = tok.encode(text, true).unwrap();
            assert_eq!(got, ids(&case["ids"]), "{name}: {text:?}");
            assert_eq!(tok.decode(&got).unwrap(), text, "{name}: round trip");
        }
    }
}

#[test]
fn streaming_any_prefix_equals_the_full_decode() {
    for name in FIXTURES {
        let tok = tokenizer(name);
        for case in expected(name)["tokenize"].as_array().unwrap() {
            let all = ids(&case["ids"]);
            for end in 0..=all.len() {
                let mut stream = tok.stream();
                let mut text = String::new();
                for &id in &all[..end] {
                    if let Some(chunk) = stream.push(id).unwrap() {
                        assert!(!chunk.contains('\u{FFFD}'), "{name}: chunk {chunk:?} holds a broken character");
                        text.push_str(&chunk);
                    }
                }
                text.extend(stream.finish().unwrap());
                assert_eq!(text, tok.decode(&all[..end]).unwrap(), "{name}: prefix of {end} ids");
            }
        }
    }
}
