//! Ring all-reduce over TCP. Each rank listens for its predecessor and connects to its
//! successor; a sum is a reduce-scatter (n-1 steps, each sending one chunk forward and adding
//! the chunk received) followed by an all-gather (n-1 steps), so every rank sends and receives
//! 2(n-1)/n of the buffer whatever n is. Sends run on a scoped thread while the receive runs
//! on the caller's, so full socket buffers never deadlock the ring. Every socket operation
//! has a timeout.
//!
//! Joining is authenticated: every rank of one attempt holds the same random secret (issued
//! by the coordinator over its authenticated channel), and a rank proves it to its successor,
//! and the successor to it, by an HMAC-SHA256 challenge-response over fresh nonces. The secret
//! itself never crosses the ring. Handshakes run on threads of their own with a short
//! deadline, so silent or wrong peers neither take the predecessor's place nor delay it.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{AllReduce, CollectiveError};

/// Ring settings.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// This rank.
    pub rank: usize,
    /// Every rank's listening address (`host:port`, resolved when dialing), by rank.
    pub peers: Vec<String>,
    /// Identifies the job: peers of another job are refused.
    pub job: u64,
    /// The attempt's shared secret: peers that cannot prove they hold it are refused.
    pub secret: RingSecret,
    /// Longest wait for a peer (connect, send, receive).
    pub timeout: Duration,
}

/// The secret every rank of one ring holds.
pub type RingSecret = [u8; 32];

/// A fresh random ring secret.
pub fn random_secret() -> RingSecret {
    rand::random()
}

/// A connected ring.
pub struct TcpRing {
    rank: usize,
    world: usize,
    next: BufWriter<TcpStream>,
    prev: BufReader<TcpStream>,
}

const MAGIC: u32 = 0x7A61_6D32;

/// Longest a joining peer may take over its handshake (it retries after).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; connections beyond are closed at once.
const MAX_HANDSHAKES: usize = 32;

impl TcpRing {
    /// Connects an `n`-rank ring on loopback whose ranks all run in this process (threads of
    /// a test, a benchmark or a one-machine job); returns the ranks in order.
    pub fn loopback(n: usize, job: u64, timeout: Duration) -> Result<Vec<Self>, CollectiveError> {
        let bind = |rank| {
            let io = |source| CollectiveError::Io {
                rank,
                what: "binding a loopback listener".into(),
                source,
            };
            let listener = TcpListener::bind("127.0.0.1:0").map_err(io)?;
            let addr = listener.local_addr().map_err(io)?;
            Ok((listener, addr.to_string()))
        };
        let (listeners, peers): (Vec<_>, Vec<_>) = (0..n)
            .map(bind)
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        Self::connect_all(listeners, &peers, job, timeout)
    }

    /// Connects every rank of a ring whose ranks all run in this process, rank r listening
    /// on `listeners[r]` and reached at `peers[r]`, with a fresh secret; returns the ranks in
    /// order.
    pub fn connect_all(
        listeners: Vec<TcpListener>,
        peers: &[String],
        job: u64,
        timeout: Duration,
    ) -> Result<Vec<Self>, CollectiveError> {
        let secret = random_secret();
        let ranks: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let cfg = RingConfig {
                    rank,
                    peers: peers.to_vec(),
                    job,
                    secret,
                    timeout,
                };
                std::thread::spawn(move || Self::connect(listener, &cfg))
            })
            .collect();
        ranks
            .into_iter()
            .map(|h| h.join().expect("a connecting thread does not panic"))
            .collect()
    }

    /// Joins the ring: accepts the predecessor on `listener` and connects to the successor.
    pub fn connect(listener: TcpListener, cfg: &RingConfig) -> Result<Self, CollectiveError> {
        let world = cfg.peers.len();
        let rank = cfg.rank;
        if rank >= world {
            return Err(protocol(
                rank,
                format!("rank {rank} of a {world}-rank ring"),
            ));
        }
        let io = |what: &str| {
            let what = what.to_string();
            move |source| CollectiveError::Io { rank, what, source }
        };
        let succ = (rank + 1) % world;
        let target = cfg.peers[succ].as_str();
        let timeout = cfg.timeout;
        let who = Handshake {
            job: cfg.job,
            secret: cfg.secret,
            rank,
            world,
        };
        // Connect to (and prove ourselves to) the successor on a thread while accepting the
        // predecessor.
        let next = std::thread::scope(|s| {
            let connector = s.spawn(move || who.join_successor(target, timeout));
            let prev = accept(&listener, who, timeout);
            let next = connector.join().expect("connector thread");
            (prev, next)
        });
        let (prev, next) = next;
        let next = next.map_err(io(&format!("connecting to rank {succ} at {target}")));
        let (next, prev) = match (next, prev) {
            (Ok(next), Ok(prev)) => (next, prev),
            (Err(e), Ok(_)) | (Ok(_), Err(e)) => return Err(e),
            // Both halves: the address this rank could not join, and who never joined it.
            (Err(next), Err(prev)) => return Err(protocol(rank, format!("{next}; {prev}"))),
        };
        next.set_write_timeout(Some(timeout))
            .map_err(io("socket option"))?;
        next.set_nodelay(true).map_err(io("socket option"))?;
        Ok(Self {
            rank,
            world,
            next: BufWriter::with_capacity(1 << 20, next),
            prev: BufReader::with_capacity(1 << 20, prev),
        })
    }

    fn chunk_range(&self, len: usize, chunk: usize) -> std::ops::Range<usize> {
        let base = len / self.world;
        let extra = len % self.world;
        let start = chunk * base + chunk.min(extra);
        start..start + base + usize::from(chunk < extra)
    }

    /// Sends `out` forward while receiving `inp.len()` floats from behind.
    fn exchange(&mut self, out: &[f32], inp: &mut [f32]) -> Result<(), CollectiveError> {
        let rank = self.rank;
        let (next, prev) = (&mut self.next, &mut self.prev);
        std::thread::scope(|s| {
            let sender = s.spawn(move || write_floats(next, out));
            let received = read_floats(prev, inp);
            let sent = sender.join().expect("sender thread");
            sent.map_err(|source| CollectiveError::Io {
                rank,
                what: "sending to the successor".into(),
                source,
            })?;
            received.map_err(|source| CollectiveError::Io {
                rank,
                what: "receiving from the predecessor".into(),
                source,
            })
        })
    }
}

impl AllReduce for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let n = self.world;
        if n == 1 {
            return Ok(());
        }
        let len = buf.len();
        let mut incoming = vec![0f32; len / n + 1];
        for step in 0..n - 1 {
            let send = self.chunk_range(len, (self.rank + n - step) % n);
            let recv = self.chunk_range(len, (self.rank + n - step - 1) % n);
            let out = buf[send].to_vec();
            let inp = &mut incoming[..recv.len()];
            self.exchange(&out, inp)?;
            buf[recv]
                .iter_mut()
                .zip(inp.iter())
                .for_each(|(b, v)| *b += v);
        }
        for step in 0..n - 1 {
            let send = self.chunk_range(len, (self.rank + 1 + n - step) % n);
            let recv = self.chunk_range(len, (self.rank + n - step) % n);
            let inp = &mut incoming[..recv.len()];
            self.exchange(&buf[send], inp)?;
            buf[recv].copy_from_slice(inp);
        }
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let n = self.world;
        if root >= n {
            return Err(protocol(
                self.rank,
                format!("broadcast from rank {root} of {n}"),
            ));
        }
        if n == 1 {
            return Ok(());
        }
        let rank = self.rank;
        let last = (root + n - 1) % n;
        if rank != root {
            read_floats(&mut self.prev, buf).map_err(|source| CollectiveError::Io {
                rank,
                what: "receiving a broadcast".into(),
                source,
            })?;
        }
        if rank != last {
            write_floats(&mut self.next, buf).map_err(|source| CollectiveError::Io {
                rank,
                what: "forwarding a broadcast".into(),
                source,
            })?;
        }
        Ok(())
    }
}

fn protocol(rank: usize, reason: String) -> CollectiveError {
    CollectiveError::Protocol { rank, reason }
}

/// One rank's side of the ring handshake.
#[derive(Clone, Copy)]
struct Handshake {
    job: u64,
    secret: RingSecret,
    rank: usize,
    world: usize,
}

/// What the acceptor sends first: magic, job, its nonce.
const CHALLENGE: usize = 4 + 8 + 16;
/// The joining peer's answer: magic, job, rank, its nonce, its MAC.
const RESPONSE: usize = 4 + 8 + 8 + 16 + 32;

impl Handshake {
    /// HMAC-SHA256 under the secret of a role label, the job, a rank and two nonces.
    fn mac(&self, role: &[u8], rank: usize, first: &[u8], second: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
        mac.update(role);
        mac.update(&self.job.to_le_bytes());
        mac.update(&(rank as u64).to_le_bytes());
        mac.update(first);
        mac.update(second);
        mac
    }

    /// Connects to the successor at `addr` and completes the handshake, retrying both until
    /// `timeout`: a peer may not listen yet, its DNS name may not resolve until its pod is
    /// up, and a refused handshake may be a listener of an older attempt.
    fn join_successor(&self, addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
        let deadline = Instant::now() + timeout;
        loop {
            match connect_once(addr).and_then(|s| self.prove(s)) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The joining side: answers the successor's challenge and checks its proof.
    fn prove(&self, mut s: TcpStream) -> std::io::Result<TcpStream> {
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut challenge = [0u8; CHALLENGE];
        s.read_exact(&mut challenge)?;
        let refused =
            |why: &str| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why.to_string());
        if challenge[..4] != MAGIC.to_le_bytes() || challenge[4..12] != self.job.to_le_bytes() {
            return Err(refused("the successor is not a rank of this job's ring"));
        }
        let theirs = &challenge[12..];
        let ours: [u8; 16] = rand::random();
        let mac = self.mac(b"taming-ring/join", self.rank, theirs, &ours);
        let mut response = Vec::with_capacity(RESPONSE);
        response.extend(MAGIC.to_le_bytes());
        response.extend(self.job.to_le_bytes());
        response.extend((self.rank as u64).to_le_bytes());
        response.extend(ours);
        response.extend(mac.finalize().into_bytes());
        s.write_all(&response)?;
        let mut proof = [0u8; 32];
        s.read_exact(&mut proof)?;
        let succ = (self.rank + 1) % self.world;
        self.mac(b"taming-ring/accept", succ, &ours, theirs)
            .verify_slice(&proof)
            .map_err(|_| refused("the successor does not hold the ring's secret"))?;
        s.set_read_timeout(None)?;
        Ok(s)
    }

    /// The accepting side: challenges a connection and keeps it only when it proves to be
    /// the predecessor holding the secret; then proves itself in turn.
    fn verify(&self, mut s: TcpStream) -> Result<TcpStream, String> {
        let io = |e: std::io::Error| e.to_string();
        s.set_nonblocking(false).map_err(io)?;
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
        s.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
        let ours: [u8; 16] = rand::random();
        let mut challenge = Vec::with_capacity(CHALLENGE);
        challenge.extend(MAGIC.to_le_bytes());
        challenge.extend(self.job.to_le_bytes());
        challenge.extend(ours);
        s.write_all(&challenge).map_err(io)?;
        let mut r = [0u8; RESPONSE];
        s.read_exact(&mut r).map_err(io)?;
        let pred = (self.rank + self.world - 1) % self.world;
        let their_rank = u64::from_le_bytes(r[12..20].try_into().expect("8"));
        if r[..4] != MAGIC.to_le_bytes() || r[4..12] != self.job.to_le_bytes() {
            return Err("a peer of another ring".into());
        }
        if their_rank != pred as u64 {
            return Err(format!("rank {their_rank}, not the predecessor {pred}"));
        }
        let theirs = &r[20..36];
        self.mac(b"taming-ring/join", pred, &ours, theirs)
            .verify_slice(&r[36..])
            .map_err(|_| "a peer without the ring's secret".to_string())?;
        let proof = self.mac(b"taming-ring/accept", self.rank, theirs, &ours);
        s.write_all(&proof.finalize().into_bytes()).map_err(io)?;
        Ok(s)
    }
}

/// Resolves `addr` and tries each of its addresses in turn.
fn connect_once(addr: &str) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{addr} resolves to no address"),
    );
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, Duration::from_secs(1)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Accepts the predecessor: each connection is challenged on a thread of its own (at most
/// [`MAX_HANDSHAKES`] at once), and the first that proves to be the predecessor wins.
fn accept(
    listener: &TcpListener,
    who: Handshake,
    timeout: Duration,
) -> Result<TcpStream, CollectiveError> {
    let rank = who.rank;
    let io = |what: &str| {
        let what = what.to_string();
        move |source| CollectiveError::Io { rank, what, source }
    };
    let pred = (rank + who.world - 1) % who.world;
    let deadline = Instant::now() + timeout;
    let (tx, rx) = mpsc::channel::<TcpStream>();
    let busy = Arc::new(AtomicUsize::new(0));
    listener.set_nonblocking(true).map_err(io("listener"))?;
    loop {
        if let Ok(s) = rx.try_recv() {
            s.set_read_timeout(Some(timeout))
                .map_err(io("socket option"))?;
            return Ok(s);
        }
        match listener.accept() {
            Ok((s, from)) => {
                if busy.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(%from, "too many ring handshakes at once; closing");
                    continue;
                }
                let (tx, busy) = (tx.clone(), busy.clone());
                std::thread::spawn(move || {
                    match who.verify(s) {
                        Ok(s) => {
                            let _ = tx.send(s);
                        }
                        Err(why) => tracing::warn!(%from, "refusing a ring peer: {why}"),
                    }
                    busy.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(protocol(
                        rank,
                        format!("rank {pred} did not connect within {timeout:?}"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io("accepting the predecessor")(e)),
        }
    }
}

// Floats travel in the hosts' byte order, which is little-endian on every target this
// project builds for.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "the ring sends little-endian floats"
);

fn write_floats(w: &mut BufWriter<TcpStream>, data: &[f32]) -> std::io::Result<()> {
    w.write_all(bytemuck::cast_slice(data))?;
    w.flush()
}

fn read_floats(r: &mut BufReader<TcpStream>, out: &mut [f32]) -> std::io::Result<()> {
    r.read_exact(bytemuck::cast_slice_mut(out))
}
