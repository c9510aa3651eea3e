//! The PLT forward, decode and cache checked against the float64 oracle in tests/fixtures.

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
