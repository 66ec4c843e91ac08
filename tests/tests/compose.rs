//! `infra/compose/compose.yaml` and `infra/docker/Dockerfile` without a Docker engine: the
//! compose services' commands run as local processes, each container port mapped to a
//! loopback port, each service name (`worker-0:7000`) to a host name with that port
//! (`localhost:PORT`: a name to resolve, as compose's are) and each container path to its
//! place here (the image's working directory, from the Dockerfile, to the checkout; named
//! volumes to temporary folders). Certificates follow the service names: the one-shot `certs`
//! service's command runs with its `--names` mapped the same way (every service name becomes
//! `localhost`, the name it is dialed by here), and so do the certificate files the services
//! name (`/tls/worker-0.pem` is `tls/localhost.pem` here). Every service must speak mutual TLS
//! with those certificates (checked in the file, and at run time: the coordinator refuses
//! plaintext and clients without a certificate), and the `launch` service's job must succeed
//! on the two workers through the two dataloaders.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_yaml::Value;
use taming_tests::http::metric;
use taming_tests::process::{Proc, bin, csv_steps, free_port, root, tiny_config};

/// One compose service.
struct Service {
    name: String,
    image: String,
    command: Vec<String>,
    env: Vec<(String, String)>,
    profiles: Vec<String>,
    /// `(volume, container path)` of its named volumes.
    volumes: Vec<(String, String)>,
    /// The services it depends on, with the condition (`service_started` for the short form).
    depends_on: BTreeMap<String, String>,
}

impl Service {
    /// A shell command line (`sh -c SCRIPT`) split into words; else `None`.
    fn script(&self) -> Option<Vec<String>> {
        match self.command.as_slice() {
            [sh, c, script] if sh == "sh" && c == "-c" => {
                Some(script.split_whitespace().map(String::from).collect())
            }
            _ => None,
        }
    }

    /// The workspace binary it runs (after `exec` in a shell command line) and its arguments.
    fn program(&self) -> (String, Vec<String>) {
        let words = self.script().map_or_else(
            || self.command.clone(),
            |w| {
                let at = w.iter().position(|x| x == "exec").expect("`exec BINARY`");
                w[at + 1..].to_vec()
            },
        );
        (words[0].clone(), words[1..].to_vec())
    }

    fn arg(&self, flag: &str) -> Option<String> {
        let (_, args) = self.program();
        args.iter()
            .position(|a| a == flag)
            .map(|i| args[i + 1].clone())
    }

    /// A TLS setting: the flag, else the environment variable.
    fn setting(&self, flag: &str, var: &str) -> Option<String> {
        self.arg(flag).or_else(|| {
            self.env
                .iter()
                .find(|(k, _)| k == var)
                .map(|(_, v)| v.clone())
        })
    }

    /// Whether it is a one-shot job the others wait for.
    fn completed_first(&self, all: &[Service]) -> bool {
        all.iter().any(|s| {
            s.depends_on.get(&self.name).map(String::as_str)
                == Some("service_completed_successfully")
        })
    }
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
    let mut doc: Value = serde_yaml::from_str(&text).unwrap();
    // `<<: *env` as compose reads it.
    doc.apply_merge().unwrap();
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
            let volumes = strings(&s["volumes"])
                .iter()
                .filter_map(|v| {
                    let mut parts = v.split(':');
                    let (volume, path) = (parts.next()?, parts.next()?);
                    // Named volumes only (a bind mount starts with `.` or `/`).
                    (!volume.starts_with(['.', '/'])).then(|| (volume.into(), path.into()))
                })
                .collect();
            let depends_on = match &s["depends_on"] {
                Value::Sequence(_) => strings(&s["depends_on"])
                    .into_iter()
                    .map(|d| (d, "service_started".to_string()))
                    .collect(),
                Value::Mapping(m) => m
                    .iter()
                    .map(|(k, v)| {
                        let condition = v["condition"].as_str().unwrap_or("service_started");
                        (k.as_str().unwrap().to_string(), condition.to_string())
                    })
                    .collect(),
                _ => BTreeMap::new(),
            };
            Service {
                name: name.as_str().unwrap().to_string(),
                image: s["image"].as_str().unwrap_or_default().to_string(),
                command: strings(&s["command"]),
                env,
                profiles: strings(&s["profiles"]),
                volumes,
                depends_on,
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
    names: Vec<String>,
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
        let mut paths = vec![(format!("{workdir}/"), root())];
        for s in services {
            for (volume, path) in &s.volumes {
                let here = tmp.join(volume);
                match paths.iter().find(|(p, _)| p == path) {
                    Some((_, there)) => assert_eq!(
                        there, &here,
                        "{}: {path} is another volume's mount point elsewhere",
                        s.name
                    ),
                    None => paths.push((path.clone(), here)),
                }
            }
        }
        let names = services.iter().map(|s| s.name.clone()).collect();
        Self {
            ports,
            paths,
            names,
        }
    }

    /// A name a certificate is made for: a service's name is `localhost` here.
    fn cert_name<'a>(&self, name: &'a str) -> &'a str {
        if self.names.iter().any(|n| n == name) {
            "localhost"
        } else {
            name
        }
    }

    /// `arg` of `service` as it reads here (`flag`: the argument before it).
    fn translate(&self, service: &str, flag: &str, arg: &str) -> String {
        if let Some(port) = arg.strip_prefix("0.0.0.0:") {
            return format!(
                "127.0.0.1:{}",
                self.ports[&(service.to_string(), port.into())]
            );
        }
        if flag == "--names" {
            let mut names: Vec<&str> = Vec::new();
            for name in arg.split(',').map(|n| self.cert_name(n)) {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            return names.join(",");
        }
        for (prefix, here) in &self.paths {
            if let Some(rest) = arg.strip_prefix(prefix.as_str()) {
                let mut path = here.join(rest.trim_start_matches('/'));
                // A service's certificate or key: made for `localhost` here.
                if let (Some(stem), Some(ext)) = (
                    path.file_stem().and_then(|s| s.to_str()),
                    path.extension().and_then(|s| s.to_str()),
                ) && ["pem", "key"].contains(&ext)
                {
                    path = path.with_file_name(format!("{}.{ext}", self.cert_name(stem)));
                }
                return path.to_string_lossy().into();
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

    fn args(&self, service: &str, args: &[String]) -> Vec<String> {
        let mut flag = "";
        args.iter()
            .map(|a| {
                let out = self.translate(service, flag, a);
                flag = a;
                out
            })
            .collect()
    }

    fn env(&self, s: &Service) -> Vec<(String, String)> {
        s.env
            .iter()
            .map(|(k, v)| (k.clone(), self.translate(&s.name, "", v)))
            .collect()
    }

    fn command(&self, s: &Service) -> Command {
        let mut cmd = match s.script() {
            Some(words) => {
                // The image's binaries are on its PATH; here they sit in the target folder.
                let dir = bin("coordinator").parent().unwrap().to_path_buf();
                let path = std::env::var_os("PATH").unwrap_or_default();
                let mut dirs = vec![dir];
                dirs.extend(std::env::split_paths(&path));
                let script: Vec<String> = words
                    .iter()
                    .zip(self.args(&s.name, &words))
                    .map(|(word, here)| {
                        if *word == here {
                            here
                        } else {
                            format!("'{here}'")
                        }
                    })
                    .collect();
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(script.join(" "))
                    .env("PATH", std::env::join_paths(dirs).unwrap());
                cmd
            }
            None => {
                let mut cmd = Command::new(bin(&s.command[0]));
                cmd.args(self.args(&s.name, &s.command[1..]));
                cmd
            }
        };
        cmd.envs(self.env(s)).current_dir(root());
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
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        text.contains(&format!("-t taming-rs:{version} ")),
        "the Dockerfile's build line tags the workspace's version {version}"
    );
    // Not root; the folders named volumes are mounted on belong to that user, so that
    // compose's new volumes do too.
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER");
    let uid = user.split(':').next().unwrap().trim();
    assert!(uid.parse::<u32>().is_ok_and(|u| u >= 10000), "USER {user}");
    let chown = text
        .lines()
        .find(|l| l.contains(&format!("chown {uid}")))
        .expect("a chown to the user");
    for s in services() {
        let (bin, _) = s.program();
        assert!(
            text.contains(&format!("target/release/{bin}")),
            "{}: the image does not copy `{bin}`",
            s.name
        );
        assert_eq!(
            s.image,
            format!("taming-rs:{version}"),
            "{}: the image is pinned to the workspace's version",
            s.name
        );
        for (volume, path) in &s.volumes {
            assert!(
                chown.split_whitespace().any(|w| w == path),
                "{}: the mount point {path} of volume {volume} is not made the user's",
                s.name
            );
        }
    }
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "target/"),
        "the build context leaves target/ out"
    );
}

/// The compose file's TLS: one `certs` service makes the certificates, every other service
/// waits for it and names its files, servers with the certificate of the name they are
/// dialed by, and nothing is allowed plaintext.
#[test]
fn every_compose_service_speaks_mutual_tls_with_the_certs_services_certificates() {
    let services = services();
    let certs: Vec<&Service> = services
        .iter()
        .filter(|s| s.completed_first(&services))
        .collect();
    let [certs] = certs.as_slice() else {
        panic!("one one-shot service makes the certificates");
    };
    let (program, args) = certs.program();
    assert_eq!(
        (program.as_str(), args[0].as_str()),
        ("coordinator", "certs")
    );
    let out = certs.arg("--out").expect("certs --out");
    let names: Vec<String> = certs
        .arg("--names")
        .expect("certs --names")
        .split(',')
        .map(String::from)
        .collect();
    let script = certs.script().expect("sh -c");
    assert_eq!(
        script[..3],
        ["test", "-f", &format!("{out}/ca.pem")],
        "certificates are made once, kept across `up`s"
    );
    let tls_volume = certs
        .volumes
        .iter()
        .find(|(_, p)| *p == out)
        .map(|(v, _)| v.clone())
        .expect("--out is a named volume");
    for s in services.iter().filter(|s| s.name != certs.name) {
        let name = &s.name;
        assert_eq!(
            s.depends_on.get(&certs.name).map(String::as_str),
            Some("service_completed_successfully"),
            "{name} starts once the certificates are made"
        );
        assert!(
            s.volumes.contains(&(tls_volume.clone(), out.clone())),
            "{name} mounts the certificates at {out}"
        );
        assert_eq!(
            s.setting("--tls-ca", "TAMING_TLS_CA"),
            Some(format!("{out}/ca.pem")),
            "{name}: the cluster CA"
        );
        let cert = s
            .setting("--tls-cert", "TAMING_TLS_CERT")
            .unwrap_or_else(|| panic!("{name}: no certificate"));
        let stem = cert
            .strip_prefix(&format!("{out}/"))
            .and_then(|c| c.strip_suffix(".pem"))
            .unwrap_or_else(|| panic!("{name}: {cert} is not one of `certs`' certificates"));
        assert!(
            names.iter().any(|n| n == stem),
            "{name}: {cert} is not made (--names)"
        );
        assert_eq!(
            s.setting("--tls-key", "TAMING_TLS_KEY"),
            Some(format!("{out}/{stem}.key")),
            "{name}: the key of {cert}"
        );
        let (_, args) = s.program();
        if args.iter().any(|a| a == "--bind") {
            assert_eq!(
                stem, name,
                "{name} serves with the certificate of the name it is dialed by"
            );
        }
        assert!(
            !args.iter().any(|a| a == "--insecure")
                && !s.env.iter().any(|(k, _)| k == "TAMING_INSECURE"),
            "{name} allows plaintext"
        );
        if s.program().0 == "dataloader" {
            assert!(
                s.env.iter().any(|(k, _)| k == "TAMING_CLUSTER_TOKEN")
                    || s.arg("--token").is_some(),
                "{name}: the cluster token"
            );
            let root = s.arg("--data-root").expect("--data-root");
            for launch in services.iter().filter_map(|l| l.arg("--data")) {
                assert!(
                    launch.starts_with(&format!("{root}/")),
                    "{name} serves {launch}"
                );
            }
        }
    }
    // Every name dialed (`host:port` of a service) has its certificate.
    for s in &services {
        for arg in s.program().1 {
            for part in arg.split(',') {
                if let Some((host, _)) = part.split_once(':')
                    && services.iter().any(|x| x.name == host)
                {
                    assert!(names.iter().any(|n| n == host), "{}: {host}", s.name);
                }
            }
        }
    }
}

#[test]
fn the_compose_mini_cluster_runs_a_launched_job_on_both_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let (workdir, _) = dockerfile();
    let services = services();
    let net = Network::new(&services, &workdir, tmp.path());
    // The one-shot jobs first (the certificates); a second run leaves them as they are.
    let mut ca = Vec::new();
    for s in services.iter().filter(|s| s.completed_first(&services)) {
        for _ in 0..2 {
            let out = net.command(s).output().unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                s.name,
                String::from_utf8_lossy(&out.stderr)
            );
            let pems: Vec<Vec<u8>> = std::fs::read_dir(tmp.path().join("tls"))
                .map(|d| {
                    let mut files: Vec<PathBuf> = d.map(|e| e.unwrap().path()).collect();
                    files.sort();
                    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
                })
                .unwrap_or_default();
            if !ca.is_empty() {
                assert_eq!(pems, ca, "{}: run again, it kept the certificates", s.name);
            }
            ca = pems;
        }
    }
    assert!(
        tmp.path().join("tls/localhost.pem").is_file(),
        "the certificates for the services' names"
    );
    let mut running = Vec::new();
    // Compose starts a service without waiting for the ones it depends on to be ready; here
    // the coordinator comes last, once the workers have been retrying for longer than its
    // heartbeat timeout: they must wait for it, not give up.
    let mut order: Vec<&Service> = services
        .iter()
        .filter(|s| s.profiles.is_empty() && !s.completed_first(&services))
        .collect();
    order.sort_by_key(|s| s.name == "coordinator");
    let names: Vec<String> = order.iter().map(|s| s.name.clone()).collect();
    let coordinator = services.iter().find(|s| s.name == "coordinator").unwrap();
    let heartbeat_timeout: u64 = coordinator
        .arg("--heartbeat-timeout")
        .expect("the coordinator's heartbeat timeout")
        .parse()
        .unwrap();
    let first_started = std::time::Instant::now();
    for s in order {
        if s.name == "coordinator" {
            wait_until_workers_retried(
                &tmp.path().join("worker-0.log"),
                &tmp.path().join("worker-1.log"),
                first_started,
                Duration::from_secs(heartbeat_timeout + 1),
            );
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
    let logs = || {
        let mut all = String::new();
        for s in &services {
            if let Ok(log) = std::fs::read_to_string(tmp.path().join(format!("{}.log", s.name))) {
                all.push_str(&format!("--- {}\n{log}", s.name));
            }
        }
        all
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !net.all_listening() {
        for (p, s) in running.iter_mut().zip(&names) {
            if let Some(status) = p.0.try_wait().unwrap() {
                panic!("{s} exited ({status}):\n{}", logs());
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every service listens after 60 s:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let launch = services.iter().find(|s| s.name == "launch").unwrap();
    let served = |d: &str| {
        let port = net.ports[&(d.to_string(), "9100".to_string())];
        metric(
            &format!("127.0.0.1:{port}"),
            "taming_dataloader_batches_total",
        )
        .unwrap()
    };
    // The launch as compose runs it; then again with its dataloaders the other way round
    // (ranks stream from the first and fail over to the next): each must serve, over TLS.
    let dataloaders = launch.arg("--dataloader-addrs").unwrap();
    let mut reversed: Vec<&str> = dataloaders.split(',').collect();
    reversed.reverse();
    for (job, dataloaders) in [
        ("vqgan", dataloaders.clone()),
        ("again", reversed.join(",")),
    ] {
        let mut args = net.args(&launch.name, &launch.command[1..]);
        let steps = args.iter().position(|a| a == "--steps").unwrap();
        args[steps + 1] = "4".into();
        let at = args.iter().position(|a| a == "--dataloader-addrs").unwrap();
        args[at + 1] = net.translate(&launch.name, "--dataloader-addrs", &dataloaders);
        let first = dataloaders.split(':').next().unwrap();
        let before = served(first);
        let at = args.iter().position(|a| a == "--out").unwrap();
        let run = PathBuf::from(&args[at + 1]).with_file_name(job);
        args[at + 1] = run.to_string_lossy().into();
        let out = Command::new(bin(&launch.command[0]))
            .args(&args)
            .envs(net.env(launch))
            .current_dir(root())
            .arg("--config")
            .arg(tiny_config(tmp.path()))
            .args(["--quiet", "--checkpoint-every", "2", "--eval-every", "2"])
            // A worker that cannot register (no TLS) fails the job, not the test's patience.
            .args(["--placement-timeout", "60"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{said}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            logs()
        );
        assert!(said.contains("on 2 worker(s)"), "{said}");
        assert!(
            run.starts_with(tmp.path().join("runs")),
            "{}",
            run.display()
        );
        assert!(run.join("model/model.safetensors").is_file());
        assert_eq!(csv_steps(&run.join("metrics.csv")), [1, 2, 3, 4]);
        let batches = served(first) - before;
        assert!(
            batches >= 8.0,
            "{job}: the ranks' batches came from {first}: {batches}\n{}",
            logs()
        );
    }

    // The coordinator speaks mutual TLS only: `status` with the launch's settings gets its
    // jobs; in plaintext, or without a client certificate, it is refused.
    let coordinator = launch.arg("--coordinator").unwrap();
    let status = |drop: &[&str]| {
        Command::new(bin("coordinator"))
            .args(["status", "--coordinator"])
            .arg(net.translate(&launch.name, "--coordinator", &coordinator))
            .env_remove("TAMING_TLS_CERT")
            .env_remove("TAMING_TLS_KEY")
            .env_remove("TAMING_TLS_CA")
            .envs(
                net.env(launch)
                    .into_iter()
                    .filter(|(k, _)| !drop.contains(&k.as_str())),
            )
            .output()
            .unwrap()
    };
    let ok = status(&[]);
    assert!(
        ok.status.success() && String::from_utf8_lossy(&ok.stdout).contains("succeeded"),
        "{}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    for drop in [
        &["TAMING_TLS_CERT", "TAMING_TLS_KEY", "TAMING_TLS_CA"][..],
        &["TAMING_TLS_CERT", "TAMING_TLS_KEY"][..],
    ] {
        let refused = status(drop);
        assert!(
            !refused.status.success(),
            "without {drop:?} the coordinator answered: {}",
            String::from_utf8_lossy(&refused.stdout)
        );
    }
    for (i, p) in running.iter_mut().enumerate() {
        assert!(p.0.try_wait().unwrap().is_none(), "service {i} is still up");
    }
}

/// Waits until both worker logs say they are retrying to reach the coordinator and `longer`
/// has passed since they started (polling; fails after two minutes, the workers' own limit).
fn wait_until_workers_retried(a: &Path, b: &Path, started: std::time::Instant, longer: Duration) {
    let retried = |log: &Path| {
        std::fs::read_to_string(log)
            .map(|text| text.contains("retrying"))
            .unwrap_or(false)
    };
    let deadline = started + Duration::from_secs(120);
    while !(retried(a) && retried(b) && started.elapsed() > longer) {
        assert!(
            std::time::Instant::now() < deadline,
            "the workers did not retry: {} {}",
            a.display(),
            b.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
