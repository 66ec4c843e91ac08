//! Ring all-reduce over TCP. Each rank listens for its predecessor and connects to its
//! successor; a sum is a reduce-scatter (n-1 steps, each sending one chunk forward and adding
//! the chunk received) followed by an all-gather (n-1 steps), so every rank sends and receives
//! 2(n-1)/n of the buffer whatever n is. Sends run on a scoped thread while the receive runs
//! on the caller's, so full socket buffers never deadlock the ring. Every socket operation
//! has a timeout.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

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
    /// Longest wait for a peer (connect, send, receive).
    pub timeout: Duration,
}

/// A connected ring.
pub struct TcpRing {
    rank: usize,
    world: usize,
    next: BufWriter<TcpStream>,
    prev: BufReader<TcpStream>,
}

const MAGIC: u32 = 0x7A61_6D31;

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
    /// on `listeners[r]` and reached at `peers[r]`; returns the ranks in order.
    pub fn connect_all(
        listeners: Vec<TcpListener>,
        peers: &[String],
        job: u64,
        timeout: Duration,
    ) -> Result<Vec<Self>, CollectiveError> {
        let ranks: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let cfg = RingConfig {
                    rank,
                    peers: peers.to_vec(),
                    job,
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
        let job = cfg.job;
        let timeout = cfg.timeout;
        let mut hello = Vec::with_capacity(20);
        hello.extend(MAGIC.to_le_bytes());
        hello.extend(job.to_le_bytes());
        hello.extend((rank as u64).to_le_bytes());
        // Connect to (and greet) the successor on a thread while accepting the predecessor.
        let next = std::thread::scope(|s| {
            let connector = s.spawn(move || {
                let mut stream = connect_retry(target, timeout)?;
                stream.write_all(&hello)?;
                Ok::<_, std::io::Error>(stream)
            });
            let prev = accept(&listener, rank, world, job, timeout);
            let next = connector.join().expect("connector thread");
            (prev, next)
        });
        let (prev, next) = next;
        // The successor first: when both fail, the address this rank could not reach is the
        // more useful half.
        let next = next.map_err(io(&format!("connecting to rank {succ} at {target}")))?;
        let prev = prev?;
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

/// Connects to `addr` (`host:port`), retrying until `timeout`: a peer may not listen yet,
/// and its DNS name may not resolve until its pod is up.
fn connect_retry(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match connect_once(addr) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
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

/// Accepts the predecessor, refusing connections that do not greet with this job and rank.
fn accept(
    listener: &TcpListener,
    rank: usize,
    world: usize,
    job: u64,
    timeout: Duration,
) -> Result<TcpStream, CollectiveError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| CollectiveError::Io { rank, what, source }
    };
    let pred = (rank + world - 1) % world;
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true).map_err(io("listener"))?;
    loop {
        match listener.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false).map_err(io("socket option"))?;
                s.set_read_timeout(Some(timeout))
                    .map_err(io("socket option"))?;
                let mut hello = [0u8; 20];
                if s.read_exact(&mut hello).is_err() {
                    continue;
                }
                let magic = u32::from_le_bytes(hello[..4].try_into().expect("4"));
                let their_job = u64::from_le_bytes(hello[4..12].try_into().expect("8"));
                let their_rank = u64::from_le_bytes(hello[12..].try_into().expect("8"));
                if magic == MAGIC && their_job == job && their_rank == pred as u64 {
                    return Ok(s);
                }
                tracing::warn!(%from, their_job, their_rank, "refusing a peer of another ring");
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
