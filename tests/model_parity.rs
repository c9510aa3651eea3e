//! The PLT forward, decode and cache checked against the float64 oracle in tests/fixtures.
// Test helpers outside #[test] functions unwrap as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::Device;
use common::*;
use plait::model::{Logits, PltModel};

fn load(name: &str) -> PltModel {
    PltModel::load(&fixture(name), &Device::Cpu).unwrap()
}

#[test]
fn full_forward_matches_the_oracle_at_every_loop_count() {
    for name in FIXTURES {
        let model = load(name);
        let exp = expected(name);
        let seq = ids(&exp["sequence_ids"]);
        let trained = model.config().plt_num_loops;
        let mut counts = vec![1, 2, 3, trained];
        counts.dedup();
        for loops in counts {
            let want = expected_logits(name, loops);
            let mut cache = model.new_cache(loops).unwrap();
            let got = model
                .prefill(&mut cache, &seq, Logits::All)
                .unwrap()
                .unwrap();
            let got: Vec<Vec<f32>> = got.to_vec2().unwrap();
            assert_eq!(got.len(), seq.len());
            for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
                let d = max_diff(g, w);
                assert!(
                    d < 1e-3,
                    "{name} loops {loops} position {pos}: max diff {d}"
                );
            }
        }
    }
}

#[test]
fn nll_and_greedy_ids_match_the_oracle() {
    use plait::engine;
    for name in FIXTURES {
        let model = load(name);
        let exp = expected(name);
        let seq = ids(&exp["sequence_ids"]);
        let prompt = ids(&exp["prompt_ids"]);
        for loops in 1..=3 {
            let want = &exp[format!("loops{loops}")];
            let score = engine::score(&model, &seq, loops).unwrap();
            let nll = want["nll"].as_f64().unwrap();
            assert!(
                (score.nll - nll).abs() < 1e-4,
                "{name} loops {loops}: nll {} vs {nll}",
                score.nll
            );
            assert_eq!(score.scored, seq.len() - 1);
            assert_eq!(
                greedy(&model, &prompt, loops, 12),
                ids(&want["greedy_from_prompt"]),
                "{name} loops {loops}"
            );
        }
    }
}

#[test]
fn incremental_decode_equals_the_full_forward() {
    for name in FIXTURES {
        let model = load(name);
        let seq = ids(&expected(name)["sequence_ids"]);
        let window = model.config().plt_window;
        for loops in [model.config().plt_num_loops, 3] {
            let want = expected_logits(name, loops);
            for k in [0, 1, window, window + 1, 17] {
                let mut cache = model.new_cache(loops).unwrap();
                if k > 0 {
                    let got = model
                        .prefill(&mut cache, &seq[..k], Logits::All)
                        .unwrap()
                        .unwrap();
                    let got: Vec<Vec<f32>> = got.to_vec2().unwrap();
                    for (pos, g) in got.iter().enumerate() {
                        let d = max_diff(g, &want[pos]);
                        assert!(
                            d < 1e-3,
                            "{name} loops {loops} k {k} prefill position {pos}: {d}"
                        );
                    }
                }
                for (pos, &id) in seq.iter().enumerate().skip(k) {
                    let got = row(&model.decode(&mut cache, id).unwrap());
                    let d = max_diff(&got, &want[pos]);
                    assert!(
                        d < 1e-3,
                        "{name} loops {loops} k {k} decode position {pos}: {d}"
                    );
                }
            }
        }
    }
}

/// Logits of a fresh full forward, the reference for cache reuse.
fn fresh_logits(model: &PltModel, seq: &[u32], loops: usize) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(loops).unwrap();
    let all = model
        .prefill(&mut cache, seq, Logits::All)
        .unwrap()
        .unwrap();
    all.to_vec2().unwrap()
}

#[test]
fn a_new_turn_computes_only_its_new_tokens_and_truncation_matches_a_fresh_run() {
    use plait::engine::{self, GenerateRequest, StepControl};
    use plait::model::{Sampler, SamplingParams};
    for name in FIXTURES {
        let model = load(name);
        let loops = model.config().plt_num_loops;
        let seq = ids(&expected(name)["sequence_ids"]);
        let (a, b) = (&seq[..40], &seq[60..75]);
        let mut cache = model.new_cache(loops).unwrap();
        let mut sampler = Sampler::new(SamplingParams::default());
        let request = GenerateRequest {
            prompt: a,
            max_tokens: 6,
            stop_ids: &[],
        };
        let turn1 = engine::generate(&model, &mut cache, &mut sampler, &request, &mut |_| {
            StepControl::Continue
        })
        .unwrap();
        assert_eq!(turn1.metrics.prefill_tokens, a.len());
        // The last sampled token has not been through the model yet; everything before it is cached.
        assert_eq!(cache.len(), a.len() + turn1.ids.len() - 1);
        let whole: Vec<u32> = [a, &turn1.ids, b].concat();
        let before = cache.computed_positions();
        let (last, reused) = model
            .prefill_reusing(&mut cache, &whole, &mut |_, _| {})
            .unwrap();
        assert_eq!(reused, a.len() + turn1.ids.len() - 1);
        assert_eq!(cache.computed_positions() - before, (b.len() + 1) as u64);
        let fresh = fresh_logits(&model, &whole, loops);
        let d = max_diff(&row(&last), fresh.last().unwrap());
        assert!(
            d < 1e-3,
            "{name}: extended turn differs from a fresh run by {d}"
        );

        // Truncate into the middle of A, continue with other tokens: equal to a fresh run.
        let cut = 23;
        model.truncate(&mut cache, cut).unwrap();
        let c = &seq[80..95];
        let cont = model.prefill(&mut cache, c, Logits::All).unwrap().unwrap();
        let cont: Vec<Vec<f32>> = cont.to_vec2().unwrap();
        let fresh = fresh_logits(&model, &[&a[..cut], c].concat(), loops);
        for (i, got) in cont.iter().enumerate() {
            let d = max_diff(got, &fresh[cut + i]);
            assert!(
                d < 1e-3,
                "{name}: after truncation, position {} differs by {d}",
                cut + i
            );
        }
        // And decoding on from there still matches.
        let next = model.decode(&mut cache, 7).unwrap();
        let fresh = fresh_logits(&model, &[&a[..cut], c, &[7]].concat(), loops);
        assert!(max_diff(&row(&next), fresh.last().unwrap()) < 1e-3);
    }
}

#[test]
fn switching_loops_at_step_boundaries_equals_a_fresh_run_at_that_count() {
    for name in FIXTURES {
        let model = load(name);
        let seq = ids(&expected(name)["sequence_ids"]);
        let oracle: Vec<Vec<Vec<f32>>> = (1..=3).map(|l| expected_logits(name, l)).collect();
        // Late switches make the bounded rebuild start past position 0.
        let schedule = [(0, 2), (45, 3), (60, 1), (75, 2), (90, 3)];
        let mut cache = model.new_cache(2).unwrap();
        let first = model
            .prefill(&mut cache, &seq[..30], Logits::All)
            .unwrap()
            .unwrap();
        let first: Vec<Vec<f32>> = first.to_vec2().unwrap();
        for (pos, got) in first.iter().enumerate() {
            assert!(max_diff(got, &oracle[1][pos]) < 1e-3);
        }
        let mut loops = 2;
        for (pos, &id) in seq.iter().enumerate().skip(30) {
            if let Some(&(_, l)) = schedule.iter().find(|(at, _)| *at == pos) {
                model.set_loops(&mut cache, l).unwrap();
                assert_eq!(cache.loops(), l);
                loops = l;
            }
            let got = row(&model.decode(&mut cache, id).unwrap());
            let d = max_diff(&got, &oracle[loops - 1][pos]);
            assert!(d < 1e-3, "{name} position {pos} at {loops} loops: {d}");
        }
    }
}

#[test]
fn the_cache_reports_its_size_and_keeps_a_fixed_ring_for_upper_loops() {
    let model = load("plt-tiny-2loop");
    let c = model.config().clone();
    let seq = ids(&expected("plt-tiny-2loop")["sequence_ids"]);
    let mut one = model.new_cache(1).unwrap();
    let mut two = model.new_cache(2).unwrap();
    model.prefill(&mut one, &seq, Logits::None).unwrap();
    model.prefill(&mut two, &seq, Logits::None).unwrap();
    let ring =
        2 * c.num_hidden_layers * c.num_key_value_heads * (c.plt_window + 1) * c.head_dim * 4;
    let carry = c.hidden_size * 4;
    assert_eq!(two.size_bytes(), one.size_bytes() + ring + carry);
    assert!(
        one.size_bytes()
            >= 2 * c.num_hidden_layers * c.num_key_value_heads * seq.len() * c.head_dim * 4
    );
}

#[test]
fn identity_lift_gives_the_same_logits_at_every_loop_count() {
    let dir = fixture_copy("plt-tiny-2loop");
    edit_json(&dir.path().join("config.json"), |c| {
        c["plt_emb_scale"] = 1.0.into();
        c["plt_hidden_scale"] = 0.0.into();
    });
    edit_weights(dir.path(), |tensors| {
        for (name, t) in tensors.iter_mut() {
            if name.ends_with("plt_gate.weight") {
                *t = t.zeros_like().unwrap();
            } else if name.ends_with("plt_gate.bias") {
                *t = (t.ones_like().unwrap() * 60.0).unwrap();
            }
        }
    });
    let model = PltModel::load(dir.path(), &Device::Cpu).unwrap();
    let seq = ids(&expected("plt-tiny-2loop")["sequence_ids"]);
    let one = fresh_logits(&model, &seq, 1);
    let decode_rows = |loops: usize| -> Vec<Vec<f32>> {
        let mut cache = model.new_cache(loops).unwrap();
        seq.iter()
            .take(12)
            .map(|&id| row(&model.decode(&mut cache, id).unwrap()))
            .collect()
    };
    let one_decoded = decode_rows(1);
    for loops in 2..=4 {
        let lifted = fresh_logits(&model, &seq, loops);
        for (pos, (a, b)) in one.iter().zip(&lifted).enumerate() {
            let d = max_diff(a, b);
            assert!(d < 1e-5, "loops {loops} position {pos}: {d}");
        }
        for (pos, (a, b)) in one_decoded.iter().zip(decode_rows(loops)).enumerate() {
            let d = max_diff(a, &b);
            assert!(d < 1e-5, "decode at loops {loops} position {pos}: {d}");
        }
    }
}

#[test]
fn fixture_copies_match_the_shared_originals() {
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if !shared.is_dir() {
        return; // a clone without ../shared beside it has only the copies
    }
    for name in FIXTURES.into_iter().chain(["default-model"]) {
        for entry in std::fs::read_dir(shared.join(name)).unwrap() {
            let original = entry.unwrap().path();
            let copy = fixture(name).join(original.file_name().unwrap());
            assert_eq!(
                std::fs::read(&original).unwrap(),
                std::fs::read(&copy).unwrap(),
                "{} drifted from ../shared",
                copy.display()
            );
        }
    }
}
