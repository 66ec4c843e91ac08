//! `infra/compose/compose.yaml` and `infra/docker/Dockerfile` without a Docker engine: the
//! compose services' commands run as local processes, each container port mapped to a
//! loopback port, each service name (`worker-0:7000`) to a host name with that port
//! (`localhost:PORT`: a name to resolve, as compose's are) and each container path to its
//! place here (the image's working directory, from the Dockerfile, to the checkout; named
//! volumes to temporary folders), and the `launch` service's job must succeed on the two
//! workers through the two dataloaders.

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_yaml::Value;
use taming_tests::http::metric;
use taming_tests::process::{Proc, bin, csv_steps, free_port, root, tiny_config, wait_for};

/// One compose service.
struct Service {
    name: String,
    command: Vec<String>,
    env: Vec<(String, String)>,
    profiles: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn services() -> Vec<Service> {
    let text = std::fs::read_to_string(root().join("infra/compose/compose.yaml")).unwrap();
    let doc: Value = serde_yaml::from_str(&text).unwrap();
    let map = doc["services"].as_mapping().expect("services");
    map.iter()
        .map(|(name, s)| {
            let env = s["environment"]
                .as_mapping()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| {
                            let v = v.as_str().map(String::from).unwrap_or_else(|| {
                                serde_yaml::to_string(v).unwrap().trim().to_string()
                            });
                            (k.as_str().unwrap().to_string(), v)
                        })
                        .collect()
                })
                .unwrap_or_default();
            Service {
                name: name.as_str().unwrap().to_string(),
                command: strings(&s["command"]),
                env,
                profiles: strings(&s["profiles"]),
            }
        })
        .collect()
}

/// The Dockerfile's last `WORKDIR` and the binaries its runtime stage copies in.
fn dockerfile() -> (String, String) {
    let text = std::fs::read_to_string(root().join("infra/docker/Dockerfile")).unwrap();
    let workdir = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("WORKDIR "))
        .unwrap()
        .trim()
        .to_string();
    (workdir, text)
}

/// Where each service's container ports are reachable here.
struct Network {
    ports: HashMap<(String, String), u16>,
    paths: Vec<(String, PathBuf)>,
}

impl Network {
    fn new(services: &[Service], workdir: &str, tmp: &Path) -> Self {
        let mut ports = HashMap::new();
        for s in services {
            for arg in &s.command {
                if let Some(port) = arg.strip_prefix("0.0.0.0:") {
                    ports.insert((s.name.clone(), port.to_string()), free_port());
                }
            }
        }
        let paths = vec![
            (format!("{workdir}/"), root()),
            ("/state".to_string(), tmp.join("state")),
            ("/runs".to_string(), tmp.join("runs")),
        ];
        Self { ports, paths }
    }

    /// `arg` of `service` as it reads here.
    fn translate(&self, service: &str, arg: &str) -> String {
        if let Some(port) = arg.strip_prefix("0.0.0.0:") {
            return format!(
                "127.0.0.1:{}",
                self.ports[&(service.to_string(), port.into())]
            );
        }
        for (prefix, here) in &self.paths {
            if let Some(rest) = arg.strip_prefix(prefix.as_str()) {
                return here
                    .join(rest.trim_start_matches('/'))
                    .to_string_lossy()
                    .into();
            }
        }
        let addrs: Vec<String> = arg
            .split(',')
            .map(|part| match part.split_once(':') {
                Some((host, port)) if self.ports.contains_key(&(host.into(), port.into())) => {
                    format!(
                        "localhost:{}",
                        self.ports[&(host.to_string(), port.to_string())]
                    )
                }
                _ => part.to_string(),
            })
            .collect();
        addrs.join(",")
    }

    fn command(&self, s: &Service) -> Command {
        let mut cmd = Command::new(bin(&s.command[0]));
        cmd.args(s.command[1..].iter().map(|a| self.translate(&s.name, a)))
            .envs(s.env.iter().cloned())
            .current_dir(root());
        cmd
    }

    fn all_listening(&self) -> bool {
        self.ports
            .values()
            .all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
    }
}

#[test]
fn the_image_holds_every_binary_the_compose_services_run() {
    let (workdir, text) = dockerfile();
    assert_eq!(workdir, "/opt/taming");
    assert!(text.contains("COPY data data") && text.contains("COPY configs configs"));
    for s in services() {
        let bin = &s.command[0];
        assert!(
            text.contains(&format!("target/release/{bin}")),
            "{}: the image does not copy `{bin}`",
            s.name
        );
    }
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "target/"),
        "the build context leaves target/ out"
    );
}

#[test]
fn the_compose_mini_cluster_runs_a_launched_job_on_both_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let (workdir, _) = dockerfile();
    let services = services();
    let net = Network::new(&services, &workdir, tmp.path());
    let mut running = Vec::new();
    // Compose starts a service without waiting for the ones it depends on to be ready; here
    // the coordinator comes last, seconds after the workers, who must wait for it.
    let mut order: Vec<&Service> = services.iter().filter(|s| s.profiles.is_empty()).collect();
    order.sort_by_key(|s| s.name == "coordinator");
    for s in order {
        if s.name == "coordinator" {
            std::thread::sleep(Duration::from_secs(2));
        }
        let log = std::fs::File::create(tmp.path().join(format!("{}.log", s.name))).unwrap();
        let child = net
            .command(s)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        running.push(Proc(child));
    }
    assert_eq!(
        running.len(),
        5,
        "coordinator, two dataloaders, two workers"
    );
    wait_for("every service's ports", Duration::from_secs(60), || {
        net.all_listening()
    });

    let launch = services.iter().find(|s| s.name == "launch").unwrap();
    let mut args: Vec<String> = launch.command[1..]
        .iter()
        .map(|a| net.translate(&launch.name, a))
        .collect();
    let steps = args.iter().position(|a| a == "--steps").unwrap();
    args[steps + 1] = "4".into();
    let out = Command::new(bin(&launch.command[0]))
        .args(&args)
        .envs(launch.env.iter().cloned())
        .current_dir(root())
        .arg("--config")
        .arg(tiny_config(tmp.path()))
        .args(["--quiet", "--checkpoint-every", "2", "--eval-every", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("on 2 worker(s)"), "{said}");
    let run = tmp.path().join("runs/vqgan");
    assert!(run.join("model/model.safetensors").is_file());
    assert_eq!(csv_steps(&run.join("metrics.csv")), [1, 2, 3, 4]);
    let served: f64 = ["dataloader-0", "dataloader-1"]
        .iter()
        .map(|d| {
            let port = net.ports[&(d.to_string(), "9100".to_string())];
            metric(
                &format!("127.0.0.1:{port}"),
                "taming_dataloader_batches_total",
            )
            .unwrap()
        })
        .sum();
    assert!(
        served >= 8.0,
        "the ranks' batches came from the dataloader services: {served}"
    );
    for (i, p) in running.iter_mut().enumerate() {
        assert!(p.0.try_wait().unwrap().is_none(), "service {i} is still up");
    }
}
