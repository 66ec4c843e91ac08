//! The Fréchet Inception Distance (Heusel et al. 2017) between two sets of feature vectors,
//! in f64: `|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))`, with each set's mean `mu` and
//! covariance `S` (unbiased, `n - 1` in the denominator, as `np.cov`) as pytorch-fid computes
//! them.
//!
//! `tr(sqrt(S1 S2))` is computed from eigenvalues of a symmetric matrix, not by a general
//! matrix square root: with the pivoted (rank-revealing) Cholesky factor `S1 = L L^T` (`L` is
//! `d x r`, `r` the numerical rank of `S1`), the non-zero eigenvalues of `S1 S2` are those of
//! the symmetric positive semi-definite `r x r` matrix `L^T S2 L` (the same form as
//! `sqrt(S1) S2 sqrt(S1)`, with `L` for `sqrt(S1)`), so `tr(sqrt(S1 S2))` is the sum of the
//! square roots of its eigenvalues (nalgebra's symmetric eigenvalue decomposition; rounding
//! noise below zero is clipped to zero). This works unchanged when `S1` is singular (fewer
//! images than dimensions), where `sqrtm` of the product is ill-conditioned, and costs
//! `O(d r^2)` for the factor.

use nalgebra::{DMatrix, DVector};

use crate::error::ModelError;

/// Mean and covariance of a set of feature vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    /// Mean, `[d]`.
    pub mu: Vec<f64>,
    /// Covariance, `[d, d]` row-major.
    pub sigma: Vec<f64>,
    /// Number of vectors, when known (statistics files do not record it).
    pub n: Option<usize>,
}

impl FeatureStats {
    /// Dimension of the feature vectors.
    pub fn dim(&self) -> usize {
        self.mu.len()
    }

    /// Checks that `sigma` is `d x d` for `mu` of length `d` and that every value is finite;
    /// `what` names the statistics in the error.
    pub fn validate(&self, what: &str) -> Result<(), ModelError> {
        let d = self.dim();
        let bad = |reason: String| ModelError::Config {
            key: what.to_string(),
            reason,
        };
        if d == 0 {
            return Err(bad("`mu` is empty".into()));
        }
        if self.sigma.len() != d * d {
            return Err(bad(format!(
                "`sigma` has {} values; a {d}-d `mu` needs {d} x {d}",
                self.sigma.len()
            )));
        }
        if let Some(i) = self.mu.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("`mu[{i}]` is {}", self.mu[i])));
        }
        if let Some(i) = self.sigma.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "`sigma[{}, {}]` is {}",
                i / d,
                i % d,
                self.sigma[i]
            )));
        }
        Ok(())
    }
}

/// Running sums from which [`FeatureStats`] are computed: the mean and the covariance are
/// accumulated about a shift (the first vector) to keep the f64 sums well conditioned.
#[derive(Debug, Clone)]
pub struct StatsAccumulator {
    dim: usize,
    n: usize,
    shift: Option<DVector<f64>>,
    sum: DVector<f64>,
    gram: DMatrix<f64>,
}

impl StatsAccumulator {
    /// An empty accumulator for `dim`-dimensional features.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            n: 0,
            shift: None,
            sum: DVector::zeros(dim),
            gram: DMatrix::zeros(dim, dim),
        }
    }

    /// Vectors added so far.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether no vector was added.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Adds the rows of `features` (`rows x dim`, row-major).
    pub fn add(&mut self, features: &[f32]) {
        let d = self.dim;
        assert_eq!(features.len() % d, 0, "features come in rows of {d}");
        let rows = features.len() / d;
        if rows == 0 {
            return;
        }
        let shift = self.shift.get_or_insert_with(|| {
            DVector::from_iterator(d, features[..d].iter().map(|&v| v as f64))
        });
        // Centered rows as a `d x rows` matrix (nalgebra is column-major: one column per row).
        let mut centered = DMatrix::from_iterator(d, rows, features.iter().map(|&v| v as f64));
        for mut col in centered.column_iter_mut() {
            col -= &*shift;
            self.sum += &col;
        }
        let transposed = centered.transpose();
        self.gram.gemm(1.0, &centered, &transposed, 1.0);
        self.n += rows;
    }

    /// Mean and unbiased covariance; at least two vectors are needed.
    pub fn finish(self) -> Result<FeatureStats, ModelError> {
        if self.n < 2 {
            return Err(ModelError::Config {
                key: "features".into(),
                reason: format!(
                    "{} feature vector(s); a covariance needs at least 2",
                    self.n
                ),
            });
        }
        let n = self.n as f64;
        let mean_shifted = &self.sum / n;
        let shift = self.shift.expect("set by the first rows");
        let mu = &shift + &mean_shifted;
        // sum (x - k)(x - k)^T - n (m - k)(m - k)^T, over n - 1.
        let mut sigma = self.gram;
        sigma.ger(-n, &mean_shifted, &mean_shifted, 1.0);
        sigma /= n - 1.0;
        // Row-major; the matrix is symmetric up to rounding, made exactly so.
        let d = self.dim;
        let mut out = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                out[i * d + j] = 0.5 * (sigma[(i, j)] + sigma[(j, i)]);
            }
        }
        Ok(FeatureStats {
            mu: mu.iter().copied().collect(),
            sigma: out,
            n: Some(self.n),
        })
    }
}

/// Mean and covariance of `features` (`rows x dim`, row-major).
pub fn stats_of(features: &[f32], dim: usize) -> Result<FeatureStats, ModelError> {
    let mut acc = StatsAccumulator::new(dim);
    acc.add(features);
    acc.finish()
}

/// The Fréchet distance between two Gaussians given by their statistics (see the module
/// documentation for how `tr(sqrt(S1 S2))` is computed).
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> Result<f64, ModelError> {
    a.validate("first statistics")?;
    b.validate("second statistics")?;
    let d = a.dim();
    if b.dim() != d {
        return Err(ModelError::Config {
            key: "statistics".into(),
            reason: format!(
                "features of dimension {d} and {} cannot be compared",
                b.dim()
            ),
        });
    }
    let mean_term: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y).powi(2)).sum();
    let s1 = symmetric(&a.sigma, d);
    let s2 = symmetric(&b.sigma, d);
    let trace = s1.trace() + s2.trace();
    Ok(mean_term + trace - 2.0 * trace_sqrt_product(&s1, &s2))
}

/// `(S + S^T) / 2` of a row-major `d x d` matrix.
fn symmetric(values: &[f64], d: usize) -> DMatrix<f64> {
    let m = DMatrix::from_row_slice(d, d, values);
    (&m + m.transpose()) * 0.5
}

/// `tr(sqrt(S1 S2))` for symmetric positive semi-definite `S1`, `S2`: the sum of the square
/// roots of the eigenvalues of `L^T S2 L`, `S1 = L L^T`.
fn trace_sqrt_product(s1: &DMatrix<f64>, s2: &DMatrix<f64>) -> f64 {
    let l = pivoted_cholesky(s1);
    if l.ncols() == 0 {
        return 0.0;
    }
    let inner = l.transpose() * (s2 * &l);
    let inner = (&inner + inner.transpose()) * 0.5;
    inner
        .symmetric_eigenvalues()
        .iter()
        .map(|&v| v.max(0.0).sqrt())
        .sum()
}

/// The `d x r` factor `L` of `S = L L^T` by Cholesky with complete (diagonal) pivoting,
/// stopped when the largest remaining diagonal is at most `d * eps * max(diag(S))` (LAPACK
/// `dpstrf`'s default tolerance): `r` is the numerical rank. Rows keep `S`'s order.
fn pivoted_cholesky(s: &DMatrix<f64>) -> DMatrix<f64> {
    let d = s.nrows();
    let mut residual: Vec<f64> = (0..d).map(|i| s[(i, i)]).collect();
    let max_diag = residual.iter().copied().fold(0.0f64, f64::max);
    let tol = d as f64 * f64::EPSILON * max_diag;
    let mut chosen = vec![false; d];
    let mut l = DMatrix::<f64>::zeros(d, d);
    let mut rank = 0;
    while rank < d {
        let (p, &best) = residual
            .iter()
            .enumerate()
            .filter(|(i, _)| !chosen[*i])
            .max_by(|x, y| x.1.total_cmp(y.1))
            .expect("an unchosen index while rank < d");
        if best <= tol || best.is_nan() {
            break;
        }
        let pivot = best.sqrt();
        // Column `rank`: (S[:, p] - L[:, :rank] L[p, :rank]^T) / pivot.
        let mut col: DVector<f64> = s.column(p).into_owned();
        if rank > 0 {
            let done = l.columns(0, rank);
            let lp = done.row(p).transpose();
            col.gemv(-1.0, &done, &lp, 1.0);
        }
        col /= pivot;
        chosen[p] = true;
        for i in 0..d {
            if chosen[i] {
                // Rows already pivoted are exact; the pivot's entry is the pivot itself.
                col[i] = if i == p { pivot } else { 0.0 };
            } else {
                residual[i] -= col[i] * col[i];
            }
        }
        l.set_column(rank, &col);
        rank += 1;
    }
    l.columns(0, rank).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(mu: Vec<f64>, sigma: Vec<f64>) -> FeatureStats {
        FeatureStats { mu, sigma, n: None }
    }

    #[test]
    fn diagonal_covariances_have_the_closed_form() {
        // Diagonal S1 = diag(a), S2 = diag(b): tr sqrt(S1 S2) = sum sqrt(a_i b_i).
        let a = stats(vec![0.0, 1.0, 2.0], diag(&[1.0, 4.0, 9.0]));
        let b = stats(vec![1.0, 1.0, 0.0], diag(&[4.0, 1.0, 0.0]));
        let want = (1.0 + 0.0 + 4.0) + (14.0 + 5.0) - 2.0 * (2.0 + 2.0 + 0.0);
        let got = frechet_distance(&a, &b).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // The distance of a distribution to itself is zero.
        let self_distance = frechet_distance(&a, &a).unwrap();
        assert!(self_distance.abs() < 1e-12, "{self_distance}");
    }

    fn diag(v: &[f64]) -> Vec<f64> {
        let d = v.len();
        let mut m = vec![0.0; d * d];
        for (i, x) in v.iter().enumerate() {
            m[i * d + i] = *x;
        }
        m
    }

    #[test]
    fn rotated_covariances_match_the_commuting_case() {
        // S1 = R diag(a) R^T and S2 = R diag(b) R^T commute: tr sqrt = sum sqrt(a_i b_i),
        // with S1 of rank 1.
        let (c, s) = (0.6f64, 0.8f64);
        let r = [[c, -s], [s, c]];
        let rot = |d: [f64; 2]| {
            let mut m = vec![0.0; 4];
            for i in 0..2 {
                for j in 0..2 {
                    m[i * 2 + j] = (0..2).map(|k| r[i][k] * d[k] * r[j][k]).sum();
                }
            }
            m
        };
        let a = stats(vec![0.0, 0.0], rot([2.0, 0.0]));
        let b = stats(vec![0.0, 0.0], rot([8.0, 3.0]));
        let want = 2.0 + 11.0 - 2.0 * 4.0;
        let got = frechet_distance(&a, &b).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn statistics_are_those_of_numpy() {
        // np.mean and np.cov(rowvar=False) of these rows.
        let rows = [1.0f32, 2.0, 3.0, 5.0, 4.0, 0.0, 2.0, 2.0, 2.0];
        let st = stats_of(&rows, 3).unwrap();
        assert_eq!(st.n, Some(3));
        let mu = [8.0 / 3.0, 8.0 / 3.0, 5.0 / 3.0];
        for (got, want) in st.mu.iter().zip(mu) {
            assert!((got - want).abs() < 1e-12);
        }
        let sigma = [26.0, 14.0, -19.0, 14.0, 8.0, -10.0, -19.0, -10.0, 14.0].map(|v| v / 6.0);
        for (got, want) in st.sigma.iter().zip(sigma) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        assert!(
            stats_of(&rows[..3], 3).is_err(),
            "one vector has no covariance"
        );
    }

    #[test]
    fn mismatched_or_broken_statistics_are_refused() {
        let a = stats(vec![0.0, 0.0], diag(&[1.0, 1.0]));
        let b = stats(vec![0.0], diag(&[1.0]));
        let err = frechet_distance(&a, &b).unwrap_err().to_string();
        assert!(err.contains("dimension 2 and 1"), "{err}");
        let nan = stats(vec![0.0, f64::NAN], diag(&[1.0, 1.0]));
        let err = frechet_distance(&a, &nan).unwrap_err().to_string();
        assert!(err.contains("mu[1]"), "{err}");
    }
}
