//! Which keys each query may attend to in a training forward, and each token's position.
//!
//! Causal attention over a right-padded row, or over a packed row of whole examples, always
//! lets query `i` see one contiguous run of keys: `[start of its example, i]` for a real token,
//! the row's real tokens for a padding slot. [`KeyRanges`] holds that run per query, which the
//! fused CPU attention uses to skip every key block no query in a block may see, without a
//! dense (b, s, s) mask. The composed attention (other devices, f64) takes the dense additive
//! bias that [`KeyRanges::to_bias`] builds from the same ranges. Left-padded rows are not of
//! this form (their padding queries see no key and get transformers' uniform softmax); they
//! keep the dense bias built from the attention mask.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The additive value that masks an attention score: the dtype's most negative finite value,
/// as transformers uses. Finite, so a fully masked row gives a uniform softmax, never NaN.
pub fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN,
        DType::BF16 => half::bf16::MIN.to_f64(),
        DType::F16 => half::f16::MIN.to_f64(),
        _ => f64::from(f32::MIN),
    }
}

/// Per batch row and query position, the half-open key range `[lo, hi)` it may attend to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRanges {
    b: usize,
    s: usize,
    lo: Vec<u32>,
    hi: Vec<u32>,
    /// Whether some range starts past 0 (packed rows), so positions restart.
    restarts: bool,
}

impl KeyRanges {
    /// Causal ranges for right-padded rows (`keep` = 1 on the first `n >= 1` tokens, 0 after):
    /// `[0, min(i + 1, n))`, exactly what the causal + padding mask allows. `None` when a row
    /// is not of that form (left padding, holes, no real token).
    pub fn right_padded(keep: &[Vec<u32>]) -> Option<Self> {
        let (b, s) = (keep.len(), keep.first().map_or(0, Vec::len));
        let mut hi = Vec::with_capacity(b * s);
        for row in keep {
            let n = row.iter().take_while(|&&k| k != 0).count();
            if n == 0 || row[n..].iter().any(|&k| k != 0) {
                return None;
            }
            hi.extend((0..s).map(|i| (i + 1).min(n) as u32));
        }
        let lo = vec![0; b * s];
        Some(Self {
            b,
            s,
            lo,
            hi,
            restarts: false,
        })
    }

    /// Block-diagonal causal ranges for packed rows of `s` tokens: query `i` of an example
    /// starting at `start` sees `[start, i]`. The padding after a row's last example forms one
    /// more block that attends only to itself (no real token sees it, and it is no target).
    pub fn packed(segments: &[Vec<usize>], s: usize) -> Result<Self> {
        let b = segments.len();
        let (mut lo, mut hi) = (Vec::with_capacity(b * s), Vec::with_capacity(b * s));
        for row in segments {
            let total: usize = row.iter().sum();
            if row.contains(&0) || total > s {
                return Err(Error::Invalid(format!(
                    "packed row segments {row:?} do not fit {s} positions"
                )));
            }
            let mut start = 0;
            for &len in row.iter().chain((total < s).then_some(&(s - total))) {
                for i in start..start + len {
                    lo.push(start as u32);
                    hi.push(i as u32 + 1);
                }
                start += len;
            }
        }
        Ok(Self {
            b,
            s,
            lo,
            hi,
            restarts: true,
        })
    }

    /// Batch rows.
    pub fn rows(&self) -> usize {
        self.b
    }

    /// Positions per row.
    pub fn len(&self) -> usize {
        self.s
    }

    /// Whether there are no positions.
    pub fn is_empty(&self) -> bool {
        self.s == 0
    }

    /// The key range `[lo, hi)` of query `i` in batch row `bi`.
    pub fn range(&self, bi: usize, i: usize) -> (usize, usize) {
        let at = bi * self.s + i;
        (self.lo[at] as usize, self.hi[at] as usize)
    }

    /// Each token's RoPE position (its index minus its example's start), (b * s) row-major;
    /// `None` when every position is its own index.
    pub fn positions(&self) -> Option<Vec<u32>> {
        self.restarts.then(|| {
            (0..self.b * self.s)
                .map(|at| (at % self.s) as u32 - self.lo[at])
                .collect()
        })
    }

    /// The dense additive bias (b, 1, s, s): 0 inside each query's range, `masked` outside.
    pub fn to_bias(&self, masked: f64, dtype: DType, dev: &Device) -> Result<Tensor> {
        let (b, s) = (self.b, self.s);
        let mut bias = vec![masked; b * s * s];
        for bi in 0..b {
            for i in 0..s {
                let (lo, hi) = self.range(bi, i);
                bias[(bi * s + i) * s + lo..(bi * s + i) * s + hi].fill(0.0);
            }
        }
        Ok(Tensor::from_vec(bias, (b, 1, s, s), dev)?.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_padded_ranges_are_the_causal_padding_mask() {
        let r = KeyRanges::right_padded(&[vec![1, 1, 1, 0, 0]]).unwrap();
        let got: Vec<_> = (0..5).map(|i| r.range(0, i)).collect();
        assert_eq!(got, vec![(0, 1), (0, 2), (0, 3), (0, 3), (0, 3)]);
        assert_eq!(r.positions(), None);
        assert!(
            KeyRanges::right_padded(&[vec![0, 1, 1]]).is_none(),
            "left padding"
        );
        assert!(
            KeyRanges::right_padded(&[vec![1, 0, 1]]).is_none(),
            "a hole"
        );
        assert!(
            KeyRanges::right_padded(&[vec![0, 0]]).is_none(),
            "no real token"
        );
    }

    #[test]
    fn packed_ranges_are_block_diagonal_and_positions_restart() {
        let r = KeyRanges::packed(&[vec![2, 3]], 7).unwrap();
        let got: Vec<_> = (0..7).map(|i| r.range(0, i)).collect();
        assert_eq!(
            got,
            vec![(0, 1), (0, 2), (2, 3), (2, 4), (2, 5), (5, 6), (5, 7)]
        );
        assert_eq!(r.positions(), Some(vec![0, 1, 0, 1, 2, 0, 1]));
        assert!(KeyRanges::packed(&[vec![4, 4]], 7).is_err());
        assert!(KeyRanges::packed(&[vec![0, 4]], 7).is_err());
    }

    #[test]
    fn the_bias_masks_exactly_outside_the_ranges() {
        let r = KeyRanges::packed(&[vec![1, 2]], 3).unwrap();
        let bias = r.to_bias(-1.0, DType::F64, &Device::Cpu).unwrap();
        let got = bias.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(got, vec![0., -1., -1., -1., 0., -1., -1., 0., 0.]);
    }
}
