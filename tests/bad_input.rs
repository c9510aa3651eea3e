//! Bad checkpoints and arguments give a clear error naming the culprit, never a panic.
// Test helpers outside #[test] functions unwrap as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use common::*;
use plait::model::{CpuKernels, Isa, PltModel, MAX_LOOPS};

fn load_error(dir: &Path) -> String {
    match PltModel::load(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_names(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "`{message}` does not name `{part}`");
    }
}

#[test]
fn missing_directory_and_files_are_named() {
    let e = load_error(Path::new("/no/such/model"));
    assert_names(&e, &["model directory", "/no/such/model"]);

    let dir = fixture_copy("plt-tiny-2loop");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_names(&load_error(dir.path()), &["config.json"]);

    let dir = fixture_copy("plt-tiny-2loop");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_names(&load_error(dir.path()), &["model.safetensors"]);
}

#[test]
fn missing_and_misshapen_tensors_are_named_with_shapes() {
    let dir = fixture_copy("plt-tiny-2loop");
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    assert_names(
        &load_error(dir.path()),
        &["model.layers.1.mlp.up_proj.weight", "missing"],
    );

    let dir = fixture_copy("plt-tiny-2loop");
    edit_weights(dir.path(), |t| {
        let bad = Tensor::zeros((64, 63), candle_core::DType::F32, &Device::Cpu).unwrap();
        t.insert("model.layers.2.self_attn.k_proj.weight".into(), bad);
    });
    assert_names(
        &load_error(dir.path()),
        &[
            "model.layers.2.self_attn.k_proj.weight",
            "[64, 63]",
            "[32, 64]",
        ],
    );

    // A query-gate config against hidden-state gate tensors is caught by the shapes.
    let dir = fixture_copy("plt-tiny-2loop");
    edit_json(&dir.path().join("config.json"), |c| {
        c["plt_gate_use_hidden_states"] = false.into();
    });
    assert_names(
        &load_error(dir.path()),
        &["plt_gate.weight", "[4, 64]", "[4, 16]"],
    );
}

#[test]
fn config_errors_name_the_field_or_the_model_type() {
    let dir = fixture_copy("plt-tiny-2loop");
    edit_json(&dir.path().join("config.json"), |c| {
        c["model_type"] = "gpt_neox".into()
    });
    assert_names(&load_error(dir.path()), &["model_type", "gpt_neox"]);

    let dir = fixture_copy("plt-tiny-2loop");
    edit_json(&dir.path().join("config.json"), |c| {
        c["plt_hidden_scale"] = "half".into()
    });
    assert_names(
        &load_error(dir.path()),
        &["config.json", "plt_hidden_scale"],
    );

    let dir = fixture_copy("plt-tiny-2loop");
    edit_json(&dir.path().join("config.json"), |c| {
        c["num_hidden_layers"] = (-3).into()
    });
    assert_names(&load_error(dir.path()), &["num_hidden_layers"]);

    let dir = fixture_copy("plt-tiny-2loop");
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    assert_names(&load_error(dir.path()), &["config.json"]);
}

#[test]
fn truncated_or_corrupt_safetensors_are_refused() {
    let dir = fixture_copy("plt-tiny-2loop");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_names(
        &load_error(dir.path()),
        &["model.safetensors", "not a valid safetensors"],
    );

    std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    assert_names(
        &load_error(dir.path()),
        &["model.safetensors", "not a valid safetensors"],
    );
}

#[test]
fn an_index_naming_a_missing_shard_is_refused() {
    let dir = fixture_copy("plt-tiny-3loop-bf16");
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    assert_names(
        &load_error(dir.path()),
        &[
            "model.safetensors.index.json",
            "model-00002-of-00003.safetensors",
        ],
    );
}

#[test]
fn loop_counts_and_token_ids_out_of_range_are_refused() {
    let model = PltModel::load(&fixture("plt-tiny-2loop"), &Device::Cpu).unwrap();
    for loops in [0, MAX_LOOPS + 1] {
        let e = model.new_cache(loops).err().unwrap().to_string();
        assert_names(&e, &[&format!("loop count {loops}")]);
    }
    let mut cache = model.new_cache(2).unwrap();
    model.set_loops(&mut cache, 8).unwrap();
    assert!(model.set_loops(&mut cache, 9).is_err());
    let e = model
        .prefill(&mut cache, &[5, 416], plait::model::Logits::Last)
        .err()
        .unwrap()
        .to_string();
    assert_names(&e, &["416", "vocabulary"]);
    assert!(
        cache.is_empty(),
        "a refused prefill leaves the cache as it was"
    );
    let e = model.decode(&mut cache, 10_000).err().unwrap().to_string();
    assert_names(&e, &["10000"]);
}

#[test]
fn commands_report_bad_input_with_a_nonzero_exit() {
    let model = fixture("plt-tiny-2loop");
    let model = model.to_str().unwrap();
    for (args, culprit) in [
        (
            vec![
                "perplexity",
                "--model",
                model,
                "--ids",
                "1,2,3",
                "--loops",
                "0",
            ],
            "--loops",
        ),
        (
            vec![
                "perplexity",
                "--model",
                model,
                "--ids",
                "1,2,3",
                "--loops",
                "9",
            ],
            "--loops",
        ),
        (
            vec![
                "generate",
                "--model",
                model,
                "--ids",
                "1,500",
                "--max-tokens",
                "2",
            ],
            "500",
        ),
        (
            vec!["perplexity", "--model", model, "--ids", "1,x"],
            "--ids",
        ),
        (
            vec!["perplexity", "--model", "/no/such/dir", "--ids", "1,2"],
            "/no/such/dir",
        ),
        (
            vec!["perplexity", "--model", model, "--ids", "7"],
            "at least 2",
        ),
    ] {
        let (code, _, stderr) = plait(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains(culprit),
            "{args:?}: `{stderr}` does not name {culprit}"
        );
    }
}

/// A fixture's expected.json ids under `key`, as the command line takes them.
fn id_args(exp: &serde_json::Value, key: &str) -> Vec<String> {
    ids(&exp[key]).iter().map(u32::to_string).collect()
}

#[test]
fn commands_print_the_documented_json() {
    let name = "plt-tiny-2loop";
    let exp = expected(name);
    let seq = id_args(&exp, "sequence_ids");
    let prompt = id_args(&exp, "prompt_ids");
    let model = fixture(name);
    let model = model.to_str().unwrap();

    let (code, stdout, stderr) = plait(&[
        "perplexity",
        "--model",
        model,
        "--ids",
        &seq.join(","),
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["tokens"], seq.len());
    assert_eq!(v["scored"], seq.len() - 1);
    assert_eq!(v["loops"], 2, "--loops defaults to plt_num_loops");
    let nll = v["nll"].as_f64().unwrap();
    assert!((nll - exp["loops2"]["nll"].as_f64().unwrap()).abs() < 1e-4);
    assert!((v["perplexity"].as_f64().unwrap() - nll.exp()).abs() < 1e-6 * nll.exp());

    let (code, stdout, stderr) = plait(&[
        "generate",
        "--model",
        model,
        "--ids",
        &prompt.join(","),
        "--max-tokens",
        "12",
        "--loops",
        "3",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["prompt_tokens"], prompt.len());
    assert_eq!(ids(&v["ids"]), ids(&exp["loops3"]["greedy_from_prompt"]));
    assert_eq!(v["loops"], 3);
    assert_eq!(v["stop_reason"], "max_tokens");
    for field in ["ttft_ms", "prefill_tok_s", "decode_tok_s"] {
        assert!(v[field].as_f64().unwrap() > 0.0, "{field}");
    }

    let (code, stdout, stderr) = plait(&[
        "bench",
        "--model",
        model,
        "--loops",
        "1,3",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--repeat",
        "2",
        "--threads",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["model"], model);
    assert_eq!(v["threads"], 1);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (r, loops) in results.iter().zip([1, 3]) {
        assert_eq!(
            (&r["loops"], &r["prompt_tokens"], &r["gen_tokens"]),
            (&loops.into(), &16.into(), &4.into())
        );
        // Decode follows the prompt.
        assert_eq!(r["depth"], 16);
        for field in ["prefill_tok_s", "decode_tok_s", "ttft_ms", "token_ms_p50"] {
            assert!(r[field].as_f64().unwrap() > 0.0, "{field}");
        }
        assert!(r["token_ms_p90"].as_f64() >= r["token_ms_p50"].as_f64());
        // Each step is issued before its token is waited for.
        let host = r["host_ms_p50"].as_f64().unwrap();
        assert!(host > 0.0 && host <= r["token_ms_p50"].as_f64().unwrap());
        assert!(r["kv_bytes"].as_u64().unwrap() > 0);
    }
    // A conversation of a user message of at least 512 tokens and its answer, then a
    // question of at least 32: the kept cache holds at least the first message, and the
    // rest (the question, and the answer as far as its text encodes to other ids than
    // those generated) is new.
    let f = &v["followup"];
    assert!(f["context_tokens"].as_u64().unwrap() >= 512, "{f}");
    assert!(f["new_tokens"].as_u64().unwrap() >= 32, "{f}");
    for field in ["ttft_cached_ms", "ttft_uncached_ms"] {
        assert!(v["followup"][field].as_f64().unwrap() > 0.0, "{field}");
    }

    // A synthetic model stored as a conversion would store it, without the follow-up.
    let config = fixture("plt-tiny-2loop").join("config.json");
    let config = config.to_str().unwrap();
    let (code, stdout, stderr) = plait(&[
        "bench",
        "--synthetic",
        config,
        "--quant",
        "q4_1",
        "--loops",
        "2",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "2",
        "--threads",
        "1",
        "--no-followup",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["weights"], "Q4_1");
    // The decode path it measured: the widest plait kernels, unless PLAIT_CPU_KERNELS says.
    assert_eq!(v["kernels"], CpuKernels::widest().name());
    assert!(v["followup"].is_null());
    assert_eq!(v["results"].as_array().unwrap().len(), 1);
    let (code, _, stderr) = plait(&["bench", "--synthetic", config, "--quant", "q3"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("unknown quantization `q3`"), "{stderr}");
    let (code, _, stderr) = plait(&["bench", "--quant", "q4_1"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--synthetic"), "{stderr}");
}

#[test]
fn bench_depth_times_decode_after_each_context_and_prints_the_documented_json() {
    let model = fixture("plt-tiny-2loop");
    let model = model.to_str().unwrap();
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--loops",
            "1,2",
            "--gen-tokens",
            "3",
            "--threads",
            "1",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--no-followup", "--repeat", "2", "--json"]);
        let (code, stdout, stderr) = plait(&args);
        assert_eq!(code, 0, "{stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        v["results"].as_array().unwrap().clone()
    };
    // A model: each context prefilled (its prefill timed), then reused for both counts.
    let results = bench(&["--model", model, "--depth", "0,600"]);
    let pairs: Vec<_> = results.iter().map(|r| (&r["depth"], &r["loops"])).collect();
    let want = [(0, 1), (0, 2), (600, 1), (600, 2)].map(|(d, l)| (d.into(), l.into()));
    assert_eq!(pairs, want.iter().map(|(d, l)| (d, l)).collect::<Vec<_>>());
    for r in &results {
        let at = r.to_string();
        assert_eq!(r["gen_tokens"], 3, "{at}");
        assert_eq!(r["prompt_tokens"], r["depth"], "{at}");
        // A decode after a context is not a first token.
        assert!(r["ttft_ms"].is_null(), "{at}");
        assert!(r["decode_tok_s"].as_f64().unwrap() > 0.0, "{at}");
        assert!(
            r["token_ms_p90"].as_f64() >= r["token_ms_p50"].as_f64(),
            "{at}"
        );
        match r["depth"].as_u64() {
            Some(0) => assert!(r["prefill_tok_s"].is_null(), "{at}"),
            _ => assert!(r["prefill_tok_s"].as_f64().unwrap() > 0.0, "{at}"),
        }
        // No --copy-bandwidth: no ceiling.
        assert!(r["decode_ceiling_tok_s"].is_null(), "{at}");
    }
    // Loop 0's cache holds the depth: more positions (past its first 512), more bytes.
    assert!(results[2]["kv_bytes"].as_u64() > results[0]["kv_bytes"].as_u64());

    // A synthetic model: random K/V, nothing prefilled; the ceiling counts the K/V read.
    let config = fixture("plt-tiny-2loop").join("config.json");
    let results = bench(&[
        "--synthetic",
        config.to_str().unwrap(),
        "--depth",
        "64",
        "--copy-bandwidth",
    ]);
    assert_eq!(results.len(), 2);
    for r in &results {
        let at = r.to_string();
        assert_eq!(
            (&r["depth"], &r["prompt_tokens"]),
            (&64.into(), &0.into()),
            "{at}"
        );
        assert!(
            r["prefill_tok_s"].is_null() && r["ttft_ms"].is_null(),
            "{at}"
        );
        let ceiling = r["decode_ceiling_tok_s"].as_f64().unwrap();
        let fraction = r["ceiling_fraction"].as_f64().unwrap();
        let rate = r["decode_tok_s"].as_f64().unwrap();
        assert!(
            (fraction - rate / ceiling).abs() < 1e-9 * fraction.max(1.0),
            "{at}"
        );
    }

    let (code, _, stderr) = plait(&["bench", "--depth", "8", "--prompt-tokens", "8"]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("--depth") && stderr.contains("--prompt-tokens"),
        "{stderr}"
    );
}

#[test]
fn bench_concurrent_times_conversations_decoding_together_and_prints_the_documented_json() {
    let model = fixture("plt-tiny-2loop");
    let config = model.join("config.json");
    for source in [
        ["--model", model.to_str().unwrap()],
        ["--synthetic", config.to_str().unwrap()],
    ] {
        let mut args = vec!["bench", "--loops", "1,2", "--concurrent", "1,3"];
        args.extend_from_slice(&source);
        args.extend_from_slice(&[
            "--prompt-tokens",
            "20",
            "--gen-tokens",
            "4",
            "--threads",
            "1",
            "--no-followup",
            "--json",
        ]);
        let (code, stdout, stderr) = plait(&args);
        assert_eq!(code, 0, "{stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let concurrent = v["concurrent"].as_array().unwrap();
        let pairs: Vec<_> = concurrent
            .iter()
            .map(|c| (c["conversations"].as_u64(), c["loops"].as_u64()))
            .collect();
        let want = [(1, 1), (1, 2), (3, 1), (3, 2)].map(|(n, l)| (Some(n), Some(l)));
        assert_eq!(pairs, want);
        for c in concurrent {
            let at = c.to_string();
            let n = c["conversations"].as_f64().unwrap();
            let (aggregate, stream) = (
                c["aggregate_tok_s"].as_f64().unwrap(),
                c["stream_tok_s"].as_f64().unwrap(),
            );
            assert!(stream > 0.0, "{at}");
            assert!((aggregate - n * stream).abs() < 1e-6 * aggregate, "{at}");
            assert!(
                c["token_ms_p99"].as_f64() >= c["token_ms_p50"].as_f64(),
                "{at}"
            );
            assert_eq!(c["context_tokens"], 20, "{at}");
        }
    }
    // A count of zero conversations is refused, naming the flag.
    let (code, _, stderr) = plait(&["bench", "--concurrent", "0"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--concurrent"), "{stderr}");
}

#[test]
fn generation_stops_on_a_stop_id_and_never_returns_it() {
    // Sampling at a high temperature reaches a stop id (2 or 401) soon for this random model.
    let model = fixture("plt-tiny-2loop");
    let model = model.to_str().unwrap();
    let mut stopped = false;
    for seed in 0..40 {
        let (code, stdout, stderr) = plait(&[
            "generate",
            "--model",
            model,
            "--ids",
            "5,6,7",
            "--max-tokens",
            "64",
            "--temperature",
            "5",
            "--seed",
            &seed.to_string(),
            "--json",
        ]);
        assert_eq!(code, 0, "{stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let out = ids(&v["ids"]);
        assert!(
            !out.contains(&2) && !out.contains(&401),
            "a stop id was returned: {out:?}"
        );
        if v["stop_reason"] == "eos" {
            stopped = true;
            break;
        }
    }
    assert!(stopped, "no seed reached a stop id");
}

#[test]
fn perplexity_incremental_compares_the_decode_path_on_every_kernel_path() {
    let name = "plt-tiny-2loop";
    let exp = expected(name);
    let seq = id_args(&exp, "sequence_ids");
    let model = fixture(name);
    for kernels in CpuKernels::supported() {
        for loops in [2, 3] {
            let (code, stdout, stderr) = plait_with_env(
                &[
                    "perplexity",
                    "--model",
                    model.to_str().unwrap(),
                    "--ids",
                    &seq.join(","),
                    "--loops",
                    &loops.to_string(),
                    "--incremental",
                    "--compare",
                    "--json",
                ],
                &[(CpuKernels::ENV, kernels.name())],
            );
            assert_eq!(code, 0, "{stderr}");
            let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            let at = format!("{} loops {loops}: {v}", kernels.name());
            assert_eq!(v["kernels"], kernels.name(), "{at}");
            assert_eq!(
                (v["tokens"].as_u64(), v["scored"].as_u64()),
                (Some(seq.len() as u64), Some(seq.len() as u64 - 1)),
                "{at}"
            );
            assert_eq!(v["loops"], loops, "{at}");
            // A dense f32 checkpoint: the decode path is the oracle's forward one token at a
            // time, so its nll is the oracle's and the two paths agree to rounding.
            let want = exp[format!("loops{loops}")]["nll"].as_f64().unwrap();
            for key in ["nll", "nll_prefill"] {
                let got = v[key].as_f64().unwrap();
                assert!((got - want).abs() < 1e-4, "{key} {got} vs {want}: {at}");
            }
            assert!(v["kl_mean"].as_f64().unwrap() < 1e-6, "{at}");
            assert!(
                v["kl_p99"].as_f64().unwrap() <= v["kl_max"].as_f64().unwrap(),
                "{at}"
            );
            assert!(v["kl_max"].as_f64().unwrap() < 1e-5, "{at}");
            assert!(v["max_logprob_error"].as_f64().unwrap() < 1e-3, "{at}");
            assert_eq!(v["top1_agreement"], 1.0, "{at}");
            let worst = v["worst_position"].as_u64().unwrap();
            assert!((1..seq.len() as u64).contains(&worst), "{at}");
        }
    }
    let (code, _, stderr) = plait(&[
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1,2",
        "--compare",
    ]);
    assert_ne!(code, 0, "--compare without --incremental");
    assert!(stderr.contains("--incremental"), "{stderr}");
}

#[test]
fn a_bad_cpu_kernel_path_is_named_with_the_valid_ones() {
    let model = fixture("plt-tiny-2loop");
    let run = |value: &str| {
        plait_with_env(
            &[
                "perplexity",
                "--model",
                model.to_str().unwrap(),
                "--ids",
                "1,2,3",
            ],
            &[(CpuKernels::ENV, value)],
        )
    };
    let (code, _, stderr) = run("avx9000");
    assert_ne!(code, 0);
    assert!(
        stderr.contains("PLAIT_CPU_KERNELS=avx9000")
            && stderr.contains("candle, scalar, avx2, vnni, vnni512")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
    // A width this CPU lacks (none on a CPU with every one) names the ones it has.
    if let Some(missing) = Isa::ALL.into_iter().find(|isa| *isa > Isa::widest()) {
        let (code, _, stderr) = run(missing.name());
        assert_ne!(code, 0);
        let runs: Vec<&str> = CpuKernels::supported().iter().map(|k| k.name()).collect();
        assert!(
            stderr.contains("lacks") && stderr.contains(&runs.join(", ")),
            "{stderr}"
        );
    }
    let (code, _, stderr) = run("scalar");
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_corrupt_gguf_is_one_line_of_error_even_with_rust_backtrace_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.gguf");
    // A GGUF v3 header claiming an absurd tensor count.
    let mut bytes = b"GGUF\x03\x00\x00\x00".to_vec();
    bytes.extend(u64::MAX.to_le_bytes());
    bytes.extend([0u8; 64]);
    std::fs::write(&path, bytes).unwrap();
    let (code, _, stderr) = plait_with_env(
        &[
            "perplexity",
            "--model",
            path.to_str().unwrap(),
            "--ids",
            "1,2",
        ],
        &[("RUST_BACKTRACE", "1")],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("corrupt.gguf") && stderr.contains("not a readable GGUF"),
        "{stderr}"
    );
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "no backtrace on screen:\n{stderr}"
    );
}

#[test]
fn a_remote_address_that_is_not_http_is_named_before_the_screen_comes_up() {
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().to_str().unwrap();
    let (code, _, stderr) = plait_with_env(
        &["--remote", "gpu-box:8000"],
        &[("PLAIT_CONFIG_DIR", config_dir)],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("--remote \"gpu-box:8000\"") && stderr.contains("http://"),
        "{stderr}"
    );
    // The same in config.toml names the key.
    std::fs::write(
        dir.path().join("config.toml"),
        "[remote]\nurl = \"gpu-box\"\n",
    )
    .unwrap();
    let (code, _, stderr) = plait_with_env(&[], &[("PLAIT_CONFIG_DIR", config_dir)]);
    assert_ne!(code, 0);
    assert!(stderr.contains("remote.url"), "{stderr}");
}
