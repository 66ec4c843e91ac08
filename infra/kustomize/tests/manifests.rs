//! The Kubernetes manifests of infra/k8s, composed as kustomize would (base and both
//! overlays): every resource parses into the Kubernetes API types with no field left over, and
//! the cross-references hold: workload selectors match their pod labels, Services select pods
//! and name ports those pods have, probes use container ports, every ConfigMap, Secret, PVC and
//! Service a pod or an autoscaler names exists, the NetworkPolicy admits exactly workers and
//! dataloaders to the coordinator, and every container runs a binary of this workspace with
//! arguments it accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PersistentVolumeClaim, PodTemplateSpec, Secret, Service,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_yaml::Value;
use taming_kustomize::{compose, identity};

fn k8s_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../k8s")
}

/// Parses `value` as `T` and refuses fields the type does not have (serialized back, the
/// value must come out the same).
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(value: &Value) -> T {
    let id = identity(value);
    let json: serde_json::Value = serde_json::to_value(value).unwrap();
    let parsed: T = serde_json::from_value(json.clone())
        .unwrap_or_else(|e| panic!("{id:?} does not parse: {e}"));
    let back = serde_json::to_value(&parsed).unwrap();
    if let Some(path) = first_difference(&json, &back, String::new()) {
        panic!("{id:?}: field `{path}` is unknown to the Kubernetes API (or was changed)");
    }
    parsed
}

fn first_difference(a: &serde_json::Value, b: &serde_json::Value, at: String) -> Option<String> {
    use serde_json::Value as J;
    match (a, b) {
        (J::Object(x), J::Object(y)) => x.iter().find_map(|(k, v)| match y.get(k) {
            Some(w) => first_difference(v, w, format!("{at}.{k}")),
            None => Some(format!("{at}.{k}")),
        }),
        (J::Array(x), J::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{at}[{i}]"))),
        _ if a == b => None,
        _ => Some(at),
    }
}

/// What the checks need, by kind.
#[derive(Default)]
struct Set {
    workloads: Vec<(String, BTreeMap<String, String>, PodTemplateSpec)>,
    services: Vec<Service>,
    config_maps: Vec<String>,
    secrets: Vec<String>,
    claims: Vec<String>,
    deployments: Vec<String>,
    autoscalers: Vec<HorizontalPodAutoscaler>,
    policies: Vec<NetworkPolicy>,
}

fn load(dir: &Path) -> Set {
    let mut set = Set::default();
    for r in compose(dir).unwrap_or_else(|e| panic!("{e}")) {
        let (kind, name) = identity(&r);
        match kind.as_str() {
            "Deployment" => {
                let d: Deployment = typed(&r);
                let spec = d.spec.expect("spec");
                set.deployments.push(name.clone());
                let sel = spec.selector.match_labels.unwrap_or_default();
                set.workloads.push((name, sel, spec.template));
            }
            "StatefulSet" => {
                let s: StatefulSet = typed(&r);
                let spec = s.spec.expect("spec");
                let service = spec.service_name.clone().expect("serviceName");
                assert!(
                    compose(dir)
                        .unwrap()
                        .iter()
                        .any(|x| identity(x) == ("Service".into(), service.clone())),
                    "StatefulSet {name}: its serviceName {service} is no Service"
                );
                let sel = spec.selector.match_labels.unwrap_or_default();
                set.workloads.push((name, sel, spec.template));
            }
            "Service" => set.services.push(typed(&r)),
            "ConfigMap" => {
                typed::<ConfigMap>(&r);
                set.config_maps.push(name);
            }
            "Secret" => {
                typed::<Secret>(&r);
                set.secrets.push(name);
            }
            "PersistentVolumeClaim" => {
                typed::<PersistentVolumeClaim>(&r);
                set.claims.push(name);
            }
            "HorizontalPodAutoscaler" => set.autoscalers.push(typed(&r)),
            "NetworkPolicy" => set.policies.push(typed(&r)),
            other => panic!("{name}: kind {other} is not expected in infra/k8s"),
        }
    }
    set
}

fn labels(t: &PodTemplateSpec) -> BTreeMap<String, String> {
    t.metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn containers(t: &PodTemplateSpec) -> &[Container] {
    &t.spec.as_ref().expect("pod spec").containers
}

fn has_port(t: &PodTemplateSpec, port: &IntOrString) -> bool {
    containers(t)
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .any(|p| match port {
            IntOrString::Int(n) => p.container_port == *n,
            IntOrString::String(s) => p.name.as_deref() == Some(s.as_str()),
        })
}

/// `arg` with `$(VAR)` references to the container's environment expanded, as the kubelet does
/// before starting it: a pod's own name (`metadata.name`) as a StatefulSet's first pod has
/// it, other references from the downward API or secrets as a placeholder word.
fn expand(arg: &str, workload: &str, c: &Container) -> String {
    let mut out = arg.to_string();
    for var in c.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("metadata.name") => format!("{workload}-0"),
                _ => "placeholder".into(),
            },
            (None, None) => String::new(),
        };
        out = out.replace(&format!("$({})", var.name), &value);
    }
    out
}

/// The workspace binary a container runs, accepting its arguments (`--help` appended: clap
/// refuses an unknown flag or a bad value before it gets there).
fn check_command(workload: &str, c: &Container) {
    let image = c.image.as_deref().unwrap_or_default();
    assert!(image.starts_with("taming-rs:"), "{workload}: image {image}");
    let command = c.command.clone().unwrap_or_default();
    let [bin] = command.as_slice() else {
        panic!("{workload}: command {command:?} is not one binary");
    };
    assert!(
        ["coordinator", "worker", "dataloader"].contains(&bin.as_str()),
        "{workload}: {bin}"
    );
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(bin);
    assert!(
        path.is_file(),
        "{} missing: run with `cargo test --workspace`",
        path.display()
    );
    let args: Vec<String> = c
        .args
        .iter()
        .flatten()
        .map(|a| expand(a, workload, c))
        .collect();
    let out = Command::new(&path)
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{workload}: `{bin} {}` is refused: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check(dir: &Path) -> Set {
    let set = load(dir);
    for (name, selector, template) in &set.workloads {
        assert!(
            selects(selector, &labels(template)),
            "{name}: selector does not match its pods"
        );
        let pod = template.spec.as_ref().unwrap();
        for c in &pod.containers {
            check_command(name, c);
            assert!(
                c.resources
                    .as_ref()
                    .is_some_and(|r| r.requests.is_some() && r.limits.is_some()),
                "{name}: requests and limits"
            );
            for probe in [&c.readiness_probe, &c.liveness_probe] {
                let probe = probe
                    .as_ref()
                    .unwrap_or_else(|| panic!("{name}/{}: probes", c.name));
                if let Some(g) = &probe.grpc {
                    assert!(
                        has_port(template, &IntOrString::Int(g.port)),
                        "{name}: grpc probe port"
                    );
                }
                if let Some(h) = &probe.http_get {
                    assert!(has_port(template, &h.port), "{name}: http probe port");
                }
            }
            for env in c.env.iter().flatten() {
                if let Some(s) = env
                    .value_from
                    .as_ref()
                    .and_then(|v| v.secret_key_ref.as_ref())
                {
                    assert!(set.secrets.contains(&s.name), "{name}: secret {}", s.name);
                }
                if let Some(m) = env
                    .value_from
                    .as_ref()
                    .and_then(|v| v.config_map_key_ref.as_ref())
                {
                    assert!(
                        set.config_maps.contains(&m.name),
                        "{name}: config map {}",
                        m.name
                    );
                }
            }
            for from in c.env_from.iter().flatten() {
                if let Some(s) = &from.secret_ref {
                    assert!(set.secrets.contains(&s.name), "{name}: secret {}", s.name);
                }
            }
            let volumes: Vec<&str> = pod
                .volumes
                .iter()
                .flatten()
                .map(|v| v.name.as_str())
                .collect();
            for m in c.volume_mounts.iter().flatten() {
                assert!(
                    volumes.contains(&m.name.as_str()),
                    "{name}: mount {}",
                    m.name
                );
            }
        }
        for v in pod.volumes.iter().flatten() {
            if let Some(c) = &v.config_map {
                assert!(
                    set.config_maps.contains(&c.name),
                    "{name}: config map {}",
                    c.name
                );
            }
            if let Some(p) = &v.persistent_volume_claim {
                assert!(
                    set.claims.contains(&p.claim_name),
                    "{name}: claim {}",
                    p.claim_name
                );
            }
        }
    }
    for svc in &set.services {
        let spec = svc.spec.as_ref().unwrap();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let selector = spec.selector.clone().unwrap_or_default();
        let target = set
            .workloads
            .iter()
            .find(|(_, _, t)| selects(&selector, &labels(t)))
            .unwrap_or_else(|| panic!("Service {name} selects no pods"));
        for p in spec.ports.iter().flatten() {
            let port = p.target_port.clone().unwrap_or(IntOrString::Int(p.port));
            assert!(
                has_port(&target.2, &port),
                "Service {name}: port {port:?} is not on {}",
                target.0
            );
        }
    }
    for hpa in &set.autoscalers {
        let target = &hpa.spec.as_ref().unwrap().scale_target_ref;
        assert!(
            target.kind == "Deployment" && set.deployments.contains(&target.name),
            "HPA target {}",
            target.name
        );
    }
    set
}

fn pod_labels(set: &Set, workload: &str) -> BTreeMap<String, String> {
    labels(&set.workloads.iter().find(|w| w.0 == workload).unwrap().2)
}

#[test]
fn base_and_overlays_parse_and_cross_reference() {
    for dir in ["base", "overlays/cpu", "overlays/gpu"] {
        let set = check(&k8s_dir().join(dir));
        // The NetworkPolicy: the coordinator admits workers and dataloaders, nobody else.
        let policy = set
            .policies
            .first()
            .expect("a NetworkPolicy")
            .spec
            .clone()
            .unwrap();
        let target = policy
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default();
        assert!(selects(&target, &pod_labels(&set, "taming-coordinator")));
        let from: Vec<BTreeMap<String, String>> = policy
            .ingress
            .iter()
            .flatten()
            .flat_map(|rule| rule.from.iter().flatten())
            .filter_map(|peer| {
                peer.pod_selector
                    .as_ref()
                    .and_then(|s| s.match_labels.clone())
            })
            .collect();
        for (w, allowed) in [
            ("taming-worker", true),
            ("taming-dataloader", true),
            ("taming-coordinator", false),
        ] {
            let labels = pod_labels(&set, w);
            assert_eq!(
                from.iter().any(|sel| selects(sel, &labels)),
                allowed,
                "{dir}: {w}"
            );
        }
    }
}

#[test]
fn the_gpu_overlay_asks_for_gpus_and_runs_workers_on_cuda() {
    let set = load(&k8s_dir().join("overlays/gpu"));
    let worker = &set
        .workloads
        .iter()
        .find(|w| w.0 == "taming-worker")
        .unwrap()
        .2;
    let c = &containers(worker)[0];
    let limits = c.resources.as_ref().unwrap().limits.clone().unwrap();
    assert_eq!(
        limits.get("nvidia.com/gpu").map(|q| q.0.as_str()),
        Some("1")
    );
    let args = c.args.clone().unwrap();
    assert!(
        args.windows(2).any(|w| w == ["--device", "cuda:0"]),
        "{args:?}"
    );
    assert_eq!(c.image.as_deref(), Some("taming-rs:cuda"));
    // The patch merged into the base container: its probes and mounts are still there.
    assert!(c.liveness_probe.is_some() && c.volume_mounts.is_some());
    let cpu = load(&k8s_dir().join("overlays/cpu"));
    let cpu_worker = &cpu
        .workloads
        .iter()
        .find(|w| w.0 == "taming-worker")
        .unwrap()
        .2;
    let cpu_limits = containers(cpu_worker)[0]
        .resources
        .clone()
        .unwrap()
        .limits
        .unwrap();
    assert!(!cpu_limits.contains_key("nvidia.com/gpu"));
}

#[test]
fn unknown_fields_and_bad_patches_are_refused() {
    let tmp = std::env::temp_dir().join(format!("taming-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("kustomization.yaml"), "resources: [svc.yaml]\n").unwrap();
    std::fs::write(
        tmp.join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {selector: {app: x}, prots: []}\n",
    )
    .unwrap();
    let docs = compose(&tmp).unwrap();
    let err = std::panic::catch_unwind(|| typed::<Service>(&docs[0])).unwrap_err();
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains(".spec.prots"), "{msg}");
    std::fs::write(
        tmp.join("kustomization.yaml"),
        "resources: [svc.yaml]\npatches: [{path: p.yaml}]\n",
    )
    .unwrap();
    std::fs::write(tmp.join("p.yaml"), "kind: Service\nmetadata: {name: y}\n").unwrap();
    let err = compose(&tmp).unwrap_err().to_string();
    assert!(err.contains("p.yaml") && err.contains("\"y\""), "{err}");
    std::fs::write(
        tmp.join("kustomization.yaml"),
        "resources: [svc.yaml]\nimages: []\n",
    )
    .unwrap();
    let err = compose(&tmp).unwrap_err().to_string();
    assert!(
        err.contains("kustomization.yaml") && err.contains("images"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn the_config_map_carries_the_shipped_default_configs() {
    let docs = compose(&k8s_dir().join("base")).unwrap();
    let cm = docs
        .iter()
        .find(|d| identity(d) == ("ConfigMap".into(), "taming-configs".into()))
        .expect("taming-configs");
    let cm: ConfigMap = typed(cm);
    let data = cm.data.unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    for (key, file) in [
        ("stage1.yaml", "configs/stage1/fashion_mnist.yaml"),
        ("stage2.yaml", "configs/stage2/fashion_mnist.yaml"),
    ] {
        let shipped = std::fs::read_to_string(root.join(file)).unwrap();
        assert_eq!(
            data[key].trim(),
            shipped.trim(),
            "{key} differs from {file}"
        );
    }
}
