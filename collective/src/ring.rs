//! Ring all-reduce over TCP. Each rank listens for its predecessor and connects to its
//! successor; a sum is a reduce-scatter (n-1 steps, each sending one chunk forward and adding
//! the chunk received) followed by an all-gather (n-1 steps), so every rank sends and receives
//! 2(n-1)/n of the buffer whatever n is. Chunks travel in pieces of [`PIECE`] floats: a
//! persistent sender thread writes queued pieces straight from the caller's buffer while the
//! caller receives, reduces and queues each piece for the next step as it arrives, so steps
//! overlap, full socket buffers never deadlock the ring, and nothing is copied or allocated
//! per call. Every socket operation has a timeout.
//!
//! Joining is authenticated: every rank of one attempt holds the same random secret (issued
//! by the coordinator over its authenticated channel), and a rank proves it to its successor,
//! and the successor to it, by an HMAC-SHA256 challenge-response over fresh nonces. The secret
//! itself never crosses the ring. Handshakes run on threads of their own with a short
//! deadline, so silent or wrong peers neither take the predecessor's place nor delay it.

use std::io::{Read, Write};
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
    next: Sender,
    prev: TcpStream,
    /// One piece of incoming floats for the reduce-scatter, reused across calls.
    scratch: Vec<f32>,
    /// Why an earlier call failed: the streams are then out of step, and every later call
    /// fails at once with this reason.
    broken: Option<String>,
}

const MAGIC: u32 = 0x7A61_6D32;

/// Longest a joining peer may take over its handshake (it retries after).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; connections beyond are closed at once.
const MAX_HANDSHAKES: usize = 32;

/// Floats per piece: chunks travel in pieces, so that a piece received and reduced is
/// forwarded while the next one is still arriving.
pub const PIECE: usize = 64 << 10;

/// A region of the caller's buffer queued for sending.
struct Piece {
    ptr: *const f32,
    len: usize,
}

// SAFETY: a `Piece` is only read, by the sender thread, while the caller of `Sender::push`
// keeps the region alive and unwritten (its contract).
unsafe impl Send for Piece {}

/// The successor's side: one persistent thread that writes queued pieces in order and
/// answers each with its result. After one failure every later piece fails too.
struct Sender {
    jobs: Option<mpsc::Sender<Piece>>,
    done: mpsc::Receiver<std::io::Result<()>>,
    /// The successor's socket, kept to shut it down when a call fails.
    stream: TcpStream,
    thread: Option<std::thread::JoinHandle<()>>,
    queued: usize,
}

impl Sender {
    fn spawn(stream: TcpStream) -> std::io::Result<Self> {
        let mut out = stream.try_clone()?;
        let (jobs, rx) = mpsc::channel::<Piece>();
        let (tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ring-send".into())
            .spawn(move || {
                let mut failed: Option<(std::io::ErrorKind, String)> = None;
                for piece in rx {
                    let result = match &failed {
                        Some((kind, why)) => Err(std::io::Error::new(*kind, why.clone())),
                        // SAFETY: `push`'s caller keeps the region valid until `wait`.
                        None => out.write_all(bytemuck::cast_slice(unsafe {
                            std::slice::from_raw_parts(piece.ptr, piece.len)
                        })),
                    };
                    if let Err(e) = &result {
                        failed.get_or_insert((e.kind(), e.to_string()));
                    }
                    if tx.send(result).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            stream,
            thread: Some(thread),
            queued: 0,
        })
    }

    /// Queues `data` for sending.
    ///
    /// # Safety
    /// `data` must stay valid and must not be written until [`Sender::wait`] returns.
    unsafe fn push(&mut self, data: &[f32]) {
        let piece = Piece {
            ptr: data.as_ptr(),
            len: data.len(),
        };
        let jobs = self.jobs.as_ref().expect("the sender runs until drop");
        if jobs.send(piece).is_ok() {
            self.queued += 1;
        }
    }

    /// Waits until every queued piece is written (or failed); the first error.
    fn wait(&mut self) -> std::io::Result<()> {
        let mut first = Ok(());
        for _ in 0..std::mem::take(&mut self.queued) {
            let result = self.done.recv().unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "the ring's sender thread ended",
                ))
            });
            if first.is_ok() {
                first = result;
            }
        }
        first
    }

    /// Makes every pending and later write fail at once (the call failed elsewhere).
    fn abort(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

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
            next: Sender::spawn(next).map_err(io("starting the sender thread"))?,
            prev,
            scratch: vec![0.0; PIECE],
            broken: None,
        })
    }

    fn chunk_range(&self, len: usize, chunk: usize) -> std::ops::Range<usize> {
        let base = len / self.world;
        let extra = len % self.world;
        let start = chunk * base + chunk.min(extra);
        start..start + base + usize::from(chunk < extra)
    }

    /// Waits for the queued sends; when `result` failed, makes them fail at once first. A
    /// failure breaks the ring for good.
    fn finish(&mut self, result: Result<(), CollectiveError>) -> Result<(), CollectiveError> {
        if result.is_err() {
            self.next.abort();
        }
        let sent = self.next.wait();
        let out = result.and_then(|()| {
            sent.map_err(|source| CollectiveError::Io {
                rank: self.rank,
                what: "sending to the successor".into(),
                source,
            })
        });
        if let Err(e) = &out {
            self.next.abort();
            self.broken = Some(e.to_string());
        }
        out
    }

    /// Fails at once when an earlier call broke the ring.
    fn check_intact(&self) -> Result<(), CollectiveError> {
        match &self.broken {
            Some(why) => Err(protocol(
                self.rank,
                format!("the ring broke in an earlier call: {why}"),
            )),
            None => Ok(()),
        }
    }

    /// The pipelined ring sum over `buf` (`len` floats at `base`): each piece received is
    /// reduced (or stored) and queued for forwarding while the next one arrives.
    ///
    /// # Safety
    /// `base..base + len` is the caller's exclusively borrowed buffer. A region is written
    /// here only after the sends that read it completed: a chunk is received in a step after
    /// the one that sent it, and its data can only arrive once every rank before it on the
    /// ring has received (so this rank has sent) the piece it depends on.
    unsafe fn ring_sum(&mut self, base: *mut f32, len: usize) -> Result<(), CollectiveError> {
        let n = self.world;
        let rank = self.rank;
        let region = |r: std::ops::Range<usize>| unsafe {
            std::slice::from_raw_parts_mut(base.add(r.start), r.len())
        };
        for piece in pieces(self.chunk_range(len, rank)) {
            unsafe { self.next.push(region(piece)) };
        }
        for step in 0..n - 1 {
            let recv = self.chunk_range(len, (rank + n - step - 1) % n);
            for piece in pieces(recv) {
                let dst = region(piece);
                let inp = &mut self.scratch[..dst.len()];
                read_floats(&mut self.prev, inp).map_err(receive_error(rank, "receiving"))?;
                dst.iter_mut().zip(inp.iter()).for_each(|(b, v)| *b += v);
                unsafe { self.next.push(dst) };
            }
        }
        for step in 0..n - 1 {
            let recv = self.chunk_range(len, (rank + n - step) % n);
            for piece in pieces(recv) {
                let dst = region(piece);
                read_floats(&mut self.prev, dst).map_err(receive_error(rank, "receiving"))?;
                if step + 2 < n {
                    unsafe { self.next.push(dst) };
                }
            }
        }
        Ok(())
    }
}

/// `range` cut into pieces of at most [`PIECE`] floats.
fn pieces(range: std::ops::Range<usize>) -> impl Iterator<Item = std::ops::Range<usize>> {
    range
        .clone()
        .step_by(PIECE)
        .map(move |start| start..(start + PIECE).min(range.end))
}

impl AllReduce for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        self.check_intact()?;
        // SAFETY: `buf` is borrowed for the whole call and `finish` waits for every send
        // that reads it.
        let result = unsafe { self.ring_sum(buf.as_mut_ptr(), buf.len()) };
        self.finish(result)
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
        self.check_intact()?;
        let forward = self.rank != (root + n - 1) % n;
        let mut result = Ok(());
        for piece in buf.chunks_mut(PIECE) {
            if self.rank != root {
                result = read_floats(&mut self.prev, piece)
                    .map_err(receive_error(self.rank, "receiving a broadcast"));
                if result.is_err() {
                    break;
                }
            }
            if forward {
                // SAFETY: `buf` is not written again before `finish` waits for the sends.
                unsafe { self.next.push(piece) };
            }
        }
        self.finish(result)
    }
}

/// An I/O error of receiving from the predecessor.
fn receive_error(rank: usize, what: &str) -> impl Fn(std::io::Error) -> CollectiveError {
    let what = format!("{what} from the predecessor");
    move |source| CollectiveError::Io {
        rank,
        what: what.clone(),
        source,
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

fn read_floats(r: &mut TcpStream, out: &mut [f32]) -> std::io::Result<()> {
    r.read_exact(bytemuck::cast_slice_mut(out))
}
