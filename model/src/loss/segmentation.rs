//! The segmentation objective's reconstruction term: binary cross-entropy of the decoder's
//! logits against one-hot label maps (the reference's `BCELossWithQuant`).

use burn::tensor::Tensor;

/// Mean binary cross-entropy of logits `z` against targets `y` in [0, 1], computed stably as
/// `max(z, 0) - z y + log(1 + exp(-|z|))`.
pub fn bce_with_logits(z: Tensor<4>, y: Tensor<4>) -> Tensor<1> {
    let softplus = z.clone().abs().neg().exp().add_scalar(1.0).log();
    (z.clone().clamp_min(0.0) - z * y + softplus).mean()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn bce(z: &[f32], y: &[f32]) -> f64 {
        let device = Device::flex();
        let t = |v: &[f32]| {
            Tensor::<4>::from_data(TensorData::new(v.to_vec(), [1, 1, 1, v.len()]), &device)
        };
        bce_with_logits(t(z), t(y)).into_scalar::<f32>() as f64
    }

    #[test]
    fn matches_the_probability_form_for_moderate_logits() {
        let (z, y) = ([-3.0f32, 0.0, 2.0, 5.0], [0.0f32, 1.0, 1.0, 0.25]);
        let expected = z
            .iter()
            .zip(y)
            .map(|(&z, y)| {
                let p = 1.0 / (1.0 + (-(z as f64)).exp());
                -(y as f64 * p.ln() + (1.0 - y as f64) * (1.0 - p).ln())
            })
            .sum::<f64>()
            / 4.0;
        let got = bce(&z, &y);
        assert!((got - expected).abs() < 1e-5, "{got} against {expected}");
    }

    #[test]
    fn stays_finite_where_the_probability_form_overflows() {
        // sigmoid(200) is 1 in f32, so log(1 - p) would be -inf; the loss is 200.
        assert!((bce(&[200.0], &[0.0]) - 200.0).abs() < 1e-3);
        assert!(bce(&[-200.0], &[0.0]).abs() < 1e-6);
    }
}
