//! Gradient clipping against torch: `clip_global_norm` scales a module's gradients as
//! `torch.nn.utils.clip_grad_norm_` (Lightning's `gradient_clip_val`) does, over all the
//! parameters together, and returns the same norm. Fixture: tools/fixtures/make_clip_fixtures.py.

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use taming_worker::learner::clip_global_norm;

fn fixture() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// Registers `values` (one list per parameter, in visiting order) as the gradients.
struct Register<'a> {
    grads: &'a mut GradientsParams,
    values: std::slice::Iter<'a, Vec<f32>>,
}

impl ModuleVisitor for Register<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.val().dims().to_vec();
        let data = TensorData::new(self.values.next().unwrap().clone(), shape);
        let grad = Tensor::<D>::from_data(data, &param.val().device());
        self.grads.register::<D>(param.id, grad);
    }
}

/// The gradients, one list per parameter, in visiting order.
struct Read<'a> {
    grads: &'a GradientsParams,
    values: Vec<Vec<f32>>,
}

impl ModuleVisitor for Read<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let g = self.grads.get::<D>(param.id).unwrap();
        self.values.push(g.into_data().try_to_vec::<f32>().unwrap());
    }
}

#[test]
fn clipping_scales_every_gradient_by_the_global_norm_as_torch_does() {
    let device = Device::flex();
    let layers: Vec<Linear> = vec![
        LinearConfig::new(4, 3).init(&device),
        LinearConfig::new(3, 2).init(&device),
    ];
    let fixture = fixture();
    let grads_in = floats(&fixture["grads"]);
    for case in fixture["cases"].as_array().unwrap() {
        let mut grads = GradientsParams::new();
        layers.visit(&mut Register {
            grads: &mut grads,
            values: grads_in.iter(),
        });
        let max_norm = case["max_norm"].as_f64().unwrap() as f32;
        let norm = clip_global_norm(&layers, &mut grads, max_norm);
        let want_norm = case["norm"].as_f64().unwrap() as f32;
        assert!(
            (norm - want_norm).abs() < 1e-5 * want_norm,
            "{norm} vs torch's {want_norm}"
        );
        let mut read = Read {
            grads: &grads,
            values: Vec::new(),
        };
        layers.visit(&mut read);
        for (got, want) in read
            .values
            .iter()
            .flatten()
            .zip(floats(&case["clipped"]).iter().flatten())
        {
            assert!(
                (got - want).abs() < 1e-6,
                "max norm {max_norm}: {got} vs torch's {want}"
            );
        }
    }
}
