//! A small seeded random number generator owned by the project.
//!
//! Fixtures, LoRA initialisation, dropout masks and shuffling all draw from it, so that the
//! same seed gives the same bytes on every machine and every dependency version (candle's CPU
//! RNG cannot be seeded, and `rand`'s algorithms may change between releases).

use serde::{Deserialize, Serialize};

/// SplitMix64: a tiny, fast, well-mixed 64-bit generator whose whole state is one `u64`,
/// which makes it trivial to checkpoint and restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for a named sub-stream, so that adding draws to one consumer (dropout, say)
    /// never shifts the numbers another consumer (initialisation) sees.
    pub fn derive(seed: u64, stream: &str) -> Self {
        // FNV-1a of the stream name, mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in stream.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let mut r = Self::new(seed ^ h);
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// This generator moved on by `draws` values of [`Rng::next_u64`] without drawing them.
    ///
    /// SplitMix64 is counter-based: each draw adds one constant to the state, so jumping is
    /// one multiply. This is how the dropout stream is shared out: the mask of global
    /// micro-batch k of a step starts at the step's state moved on by every draw of micro-batches
    /// 0..k, whichever rank or thread computes it, and the bits are those of one serial stream.
    pub fn jumped(&self, draws: u64) -> Self {
        Self {
            state: self
                .state
                .wrapping_add(0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(draws)),
        }
    }

    /// A uniform float in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform float in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// A standard normal sample (Box-Muller; one of the pair is discarded for simplicity).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A uniform integer in [0, n); `n` must be non-zero.
    pub fn below(&mut self, n: u64) -> u64 {
        // Lemire's multiply-shift; the tiny bias for huge n is irrelevant at our sizes.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_same_stream_and_streams_differ() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(
            Rng::derive(7, "init").next_u64(),
            Rng::derive(7, "dropout").next_u64()
        );
    }

    #[test]
    fn uniform_stays_in_range_and_normal_has_unit_scale() {
        let mut r = Rng::new(1);
        let xs: Vec<f64> = (0..20_000).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
        for _ in 0..1000 {
            let u = r.uniform(-0.5, 0.25);
            assert!((-0.5..0.25).contains(&u));
        }
    }

    #[test]
    fn a_jump_lands_where_the_draws_would_have() {
        let start = Rng::derive(5, "dropout");
        let mut serial = start.clone();
        for n in [0u64, 1, 7, 1000] {
            let jumped = start.jumped(n);
            let mut walked = start.clone();
            for _ in 0..n {
                walked.next_u64();
            }
            assert_eq!(jumped, walked, "{n} draws");
        }
        // Jumps compose: 3 then 4 is 7.
        assert_eq!(start.jumped(3).jumped(4), start.jumped(7));
        for _ in 0..7 {
            serial.next_u64();
        }
        assert_eq!(serial, start.jumped(7));
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u32> = (0..100).collect();
        Rng::new(3).shuffle(&mut v);
        let mut s = v.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_ne!(v, s);
    }
}
