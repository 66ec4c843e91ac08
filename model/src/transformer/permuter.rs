//! Token orders: how a `[h, w]` grid of codes becomes a sequence. `order[s]` is the raster
//! index of the grid position at sequence position `s` (the reference's
//! `forward_shuffle_idx`).

use super::config::PermuterKind;

/// A grid order and its inverse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permutation {
    order: Vec<usize>,
    inverse: Vec<usize>,
}

impl Permutation {
    /// The order of `kind` over an `[h, w]` grid, or why that grid cannot have it.
    pub fn new(kind: PermuterKind, [h, w]: [usize; 2]) -> Result<Self, String> {
        let order = match kind {
            PermuterKind::Identity => (0..h * w).collect(),
            PermuterKind::ZCurve => z_curve(h, w)?,
            PermuterKind::Subsample => subsample(h, w)?,
        };
        let mut inverse = vec![0; order.len()];
        for (s, &p) in order.iter().enumerate() {
            inverse[p] = s;
        }
        Ok(Self { order, inverse })
    }

    /// Raster index at each sequence position.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// A raster grid as a sequence.
    pub fn forward<T: Copy>(&self, raster: &[T]) -> Vec<T> {
        self.order.iter().map(|&p| raster[p]).collect()
    }

    /// A sequence back in raster order.
    pub fn backward<T: Copy>(&self, seq: &[T]) -> Vec<T> {
        self.inverse.iter().map(|&s| seq[s]).collect()
    }
}

fn power_of_two_square(h: usize, w: usize, name: &str) -> Result<(), String> {
    if h != w || !h.is_power_of_two() {
        return Err(format!(
            "the {name} order needs a square grid with a power-of-two side, not {h}x{w}"
        ));
    }
    Ok(())
}

/// Morton order: positions sorted by their interleaved (row, column) bits, row bit higher.
fn z_curve(h: usize, w: usize) -> Result<Vec<usize>, String> {
    power_of_two_square(h, w, "z-curve")?;
    let bits = h.trailing_zeros();
    let code = |i: usize, j: usize| {
        (0..bits).fold(0usize, |acc, b| {
            acc | (((i >> b) & 1) << (2 * b + 1)) | (((j >> b) & 1) << (2 * b))
        })
    };
    let mut order: Vec<usize> = (0..h * w).collect();
    order.sort_by_key(|&p| code(p / w, p % w));
    Ok(order)
}

/// Coarse to fine: each grid is split into its four 2x2-subsampled grids (offsets (0,0),
/// (0,1), (1,0), (1,1)), recursively, until single positions remain.
fn subsample(h: usize, w: usize) -> Result<Vec<usize>, String> {
    power_of_two_square(h, w, "subsample")?;
    // `grids` holds the current sub-grids, each a raster list of positions of side `side`.
    let mut grids: Vec<Vec<usize>> = vec![(0..h * w).collect()];
    let mut side = h;
    while side > 1 {
        let half = side / 2;
        let mut next = Vec::with_capacity(grids.len() * 4);
        for g in &grids {
            for (di, dj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let sub = (0..half)
                    .flat_map(|i| (0..half).map(move |j| g[(2 * i + di) * side + 2 * j + dj]))
                    .collect();
                next.push(sub);
            }
        }
        grids = next;
        side = half;
    }
    Ok(grids.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_permutations_and_invert() {
        for kind in [
            PermuterKind::Identity,
            PermuterKind::ZCurve,
            PermuterKind::Subsample,
        ] {
            let p = Permutation::new(kind, [8, 8]).unwrap();
            let raster: Vec<usize> = (0..64).collect();
            let seq = p.forward(&raster);
            let mut sorted = seq.clone();
            sorted.sort();
            assert_eq!(sorted, raster, "{kind:?}");
            assert_eq!(p.backward(&seq), raster, "{kind:?}");
        }
    }

    #[test]
    fn refuses_grids_it_cannot_order() {
        let err = Permutation::new(PermuterKind::ZCurve, [8, 12]).unwrap_err();
        assert!(err.contains("8x12"), "{err}");
        assert!(Permutation::new(PermuterKind::Identity, [8, 12]).is_ok());
    }
}
