//! Tokenizers, chat templates, stop ids and streaming, checked against expected.json.
// Test helpers outside #[test] functions unwrap as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
                        assert!(
                            !chunk.contains('\u{FFFD}'),
                            "{name}: chunk {chunk:?} holds a broken character"
                        );
                        text.push_str(&chunk);
                    }
                }
                text.extend(stream.finish().unwrap());
                assert_eq!(
                    text,
                    tok.decode(&all[..end]).unwrap(),
                    "{name}: prefix of {end} ids"
                );
            }
        }
    }
}

#[test]
fn chat_is_rendered_byte_for_byte_and_tokenizes_to_the_expected_ids() {
    use plait::model::{ChatMessage, LoadedModel};
    for name in FIXTURES {
        let loaded = LoadedModel::load(&fixture(name), &candle_core::Device::Cpu).unwrap();
        let chat = &expected(name)["chat"];
        let messages: Vec<ChatMessage> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let add = chat["add_generation_prompt"].as_bool().unwrap();
        let text = loaded.template.render(&messages, add).unwrap();
        assert_eq!(text, chat["text"].as_str().unwrap(), "{name}");
        let tok = loaded.tokenizer.as_ref().unwrap();
        assert_eq!(
            tok.encode(&text, false).unwrap(),
            ids(&chat["ids"]),
            "{name}"
        );
        assert_eq!(tok.decode(&ids(&chat["ids"])).unwrap(), text);
        assert_eq!(loaded.stop_ids, ids(&expected(name)["stop_ids"]), "{name}");
    }
}

#[test]
fn perplexity_of_a_file_equals_perplexity_of_its_ids() {
    for name in FIXTURES {
        let exp = expected(name);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("text.txt");
        std::fs::write(&file, exp["tokenize"][0]["text"].as_str().unwrap()).unwrap();
        let model = fixture(name);
        let model = model.to_str().unwrap();
        let seq: Vec<String> = ids(&exp["sequence_ids"])
            .iter()
            .map(u32::to_string)
            .collect();
        let (code, from_file, stderr) = plait(&[
            "perplexity",
            "--model",
            model,
            "--file",
            file.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(code, 0, "{stderr}");
        let (code, from_ids, stderr) = plait(&[
            "perplexity",
            "--model",
            model,
            "--ids",
            &seq.join(","),
            "--json",
        ]);
        assert_eq!(code, 0, "{stderr}");
        let a: serde_json::Value = serde_json::from_str(&from_file).unwrap();
        let b: serde_json::Value = serde_json::from_str(&from_ids).unwrap();
        assert_eq!(a, b, "{name}");
        let trained = b["loops"].as_u64().unwrap();
        let want = exp[format!("loops{trained}")]["nll"].as_f64().unwrap();
        assert!((a["nll"].as_f64().unwrap() - want).abs() < 1e-4);
    }
}

#[test]
fn ask_streams_the_answer_and_summarises_on_stderr() {
    let model = fixture("plt-tiny-2loop");
    let model = model.to_str().unwrap();
    let (code, json, stderr) = plait(&[
        "ask",
        "--model",
        model,
        "--max-tokens",
        "16",
        "--json",
        "hello",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let (code, streamed, stderr) = plait(&["ask", "--model", model, "--max-tokens", "16", "hello"]);
    assert_eq!(code, 0, "{stderr}");
    // Greedy both times: the streamed text is the JSON's text, plus the closing newline.
    assert_eq!(streamed, format!("{}\n", json["text"].as_str().unwrap()));
    assert!(
        stderr.contains("tokens")
            && stderr.contains("TTFT")
            && stderr.contains("tok/s")
            && stderr.contains("loops 2"),
        "{stderr}"
    );

    let (code, _, stderr) = plait(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "def fib(n):",
        "--max-tokens",
        "4",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_tokenizer_json_round_trips_through_the_directory() {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{
        DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
        Tokenizer, TokenizerBuilder,
    };
    // A byte-level BPE over the 256 byte symbols with a few merges.
    let bytes = ByteLevel::alphabet();
    let mut vocab: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    vocab.sort();
    let merges = vec![
        ("d".to_string(), "e".to_string()),
        ("de".to_string(), "f".to_string()),
        ("Ġ".to_string(), "x".to_string()),
    ];
    for (a, b) in &merges {
        vocab.push(format!("{a}{b}"));
    }
    let vocab_map: tokenizers::models::bpe::Vocab = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map, merges)
        .build()
        .unwrap();
    let built: Tokenizer = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(bpe.into())
    .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .unwrap()
    .into();
    let dir = tempfile::tempdir().unwrap();
    built
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    let end_id = vocab.len();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        format!(r#"{{"added_tokens_decoder": {{"{end_id}": {{"content": "<|end|>", "special": true}}}}, "eos_token": "<|end|>"}}"#),
    )
    .unwrap();
    let config = TokenizerConfig::from_dir(dir.path()).unwrap();
    let tok = TextTokenizer::from_dir(dir.path(), &config)
        .unwrap()
        .unwrap();
    let text = "def x = 'héllo' ✓";
    let direct = built.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(tok.encode(text, false).unwrap(), direct);
    assert_eq!(tok.decode(&direct).unwrap(), text);
    let with_end = tok.encode("def<|end|>", false).unwrap();
    assert_eq!(with_end.last(), Some(&(end_id as u32)));
    assert_eq!(tok.eos_id(), Some(end_id as u32));
}

fn assert_load_error(dir: &std::path::Path, parts: &[&str]) {
    let e = match plait::model::LoadedModel::load(dir, &candle_core::Device::Cpu) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    for part in parts {
        assert!(e.contains(part), "`{e}` does not name `{part}`");
    }
}

#[test]
fn bad_tokenizer_files_are_named() {
    let dir = fixture_copy("plt-tiny-2loop");
    let path = dir.path().join("tokenizer.model");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
    assert_load_error(dir.path(), &["tokenizer.model"]);
    std::fs::write(&path, b"\x0a\xff\xff\xff\x0fjunk").unwrap();
    assert_load_error(dir.path(), &["tokenizer.model"]);

    let dir = fixture_copy("plt-tiny-2loop");
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3").unwrap();
    assert_load_error(dir.path(), &["tokenizer.json"]);
}

#[test]
fn bad_templates_are_reported_with_their_line_or_message() {
    let dir = fixture_copy("plt-tiny-2loop");
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}\n{{ m.content }\n{% endfor %}",
    )
    .unwrap();
    assert_load_error(dir.path(), &["chat_template.jinja", "line 2"]);

    let dir = fixture_copy("plt-tiny-2loop");
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}",
    )
    .unwrap();
    let model = dir.path().to_str().unwrap();
    let (code, _, stderr) = plait(&["ask", "--model", model, "hello"]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("a system message must come first"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}

#[test]
fn a_template_producing_ids_beyond_the_model_vocabulary_is_refused() {
    let dir = fixture_copy("plt-tiny-2loop");
    edit_json(&dir.path().join("tokenizer_config.json"), |c| {
        c["added_tokens_decoder"]["900"] =
            serde_json::json!({"content": "<|tool|>", "special": true});
    });
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "<|tool|>{{ messages[0]['content'] }}",
    )
    .unwrap();
    let model = dir.path().to_str().unwrap();
    let (code, _, stderr) = plait(&["ask", "--model", model, "hello"]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("900") && stderr.contains("vocabulary"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}

#[test]
fn a_unigram_model_with_nfkc_normalization_matches_sentencepiece() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        data.join("unigram-nfkc.model"),
        dir.path().join("tokenizer.model"),
    )
    .unwrap();
    let config = TokenizerConfig::default();
    let tok = TextTokenizer::from_dir(dir.path(), &config)
        .unwrap()
        .unwrap();
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data.join("unigram-nfkc.expected.json")).unwrap(),
    )
    .unwrap();
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, ids(&case["ids"]), "{text:?}");
        assert_eq!(
            tok.decode(&got).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
}
