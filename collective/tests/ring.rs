//! The TCP ring against a plain sum, for odd buffer sizes and 2 to 5 ranks; broadcast and
//! mean; strangers, impostors without the secret and silent sockets refused without
//! blocking the ring; NCCL refused clearly without CUDA.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use taming_collective::ring::PIECE;
use taming_collective::{AllReduce, RingConfig, TcpRing, all_reduce_mean, nccl, random_secret};

/// Odd sizes, from less than a float per rank to chunks of several pieces each.
const LENGTHS: [usize; 6] = [1, 3, 7, 1001, 65_537, 5 * PIECE * 2 + 13];

fn rings(n: usize, job: u64) -> Vec<TcpRing> {
    TcpRing::loopback(n, job, Duration::from_secs(20)).unwrap()
}

/// A deterministic pseudo-random buffer per rank and length.
fn buffer(rank: usize, len: usize) -> Vec<f32> {
    let mut s = 0x9E37_79B9u64.wrapping_mul(rank as u64 + 1) ^ len as u64;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// Runs `f` on every rank of the group at once and returns the results by rank.
fn on_all<T: Send + 'static>(
    group: Vec<TcpRing>,
    f: impl Fn(&mut TcpRing) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let handles: Vec<_> = group
        .into_iter()
        .map(|mut ring| {
            let f = f.clone();
            std::thread::spawn(move || f(&mut ring))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn ring_sum_equals_a_plain_sum_for_odd_sizes_and_two_to_five_ranks() {
    for n in 2..=5 {
        let results = on_all(rings(n, 7), |ring| {
            LENGTHS
                .iter()
                .map(|&len| {
                    let mut buf = buffer(ring.rank(), len);
                    ring.all_reduce_sum(&mut buf).unwrap();
                    buf
                })
                .collect::<Vec<_>>()
        });
        for (li, &len) in LENGTHS.iter().enumerate() {
            let inputs: Vec<Vec<f32>> = (0..n).map(|r| buffer(r, len)).collect();
            let expected: Vec<f32> = (0..len)
                .map(|i| inputs.iter().map(|b| b[i]).sum())
                .collect();
            for (rank, got) in results.iter().enumerate() {
                for (i, (g, e)) in got[li].iter().zip(&expected).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 * e.abs().max(1.0),
                        "n={n} len={len} rank={rank} [{i}]: {g} vs {e}"
                    );
                }
            }
            // Every rank holds bit-identical results (same summation order for each chunk).
            assert!(
                results.iter().all(|r| r[li] == results[0][li]),
                "n={n} len={len}"
            );
        }
    }
}

#[test]
fn broadcast_and_mean() {
    let long = 3 * PIECE + 17;
    let results = on_all(rings(3, 8), move |ring| {
        let mut b = buffer(ring.rank(), 1001);
        ring.broadcast(&mut b, 2).unwrap();
        let mut l = buffer(ring.rank(), long);
        ring.broadcast(&mut l, 1).unwrap();
        let mut m = vec![ring.rank() as f32; 5];
        all_reduce_mean(ring, &mut m).unwrap();
        (b, l, m)
    });
    for (b, l, m) in &results {
        assert_eq!(b, &buffer(2, 1001));
        assert_eq!(l, &buffer(1, long));
        assert_eq!(m, &vec![1.0; 5]);
    }
}

/// One ring serves many calls of changing sizes (its sender thread and buffers are reused),
/// each equal to a plain sum.
#[test]
fn repeated_calls_of_changing_sizes_on_one_ring() {
    let sizes = [PIECE + 1, 5, 2 * PIECE, 1, 4 * PIECE - 3];
    let results = on_all(rings(4, 11), move |ring| {
        (0..3)
            .flat_map(|_| sizes)
            .map(|len| {
                let mut buf = buffer(ring.rank(), len);
                ring.all_reduce_sum(&mut buf).unwrap();
                buf
            })
            .collect::<Vec<_>>()
    });
    for (i, len) in (0..3).flat_map(|_| sizes).enumerate() {
        let inputs: Vec<Vec<f32>> = (0..4).map(|r| buffer(r, len)).collect();
        let expected: Vec<f32> = (0..len)
            .map(|j| inputs.iter().map(|b| b[j]).sum())
            .collect();
        for got in &results {
            for (g, e) in got[i].iter().zip(&expected) {
                assert!((g - e).abs() <= 1e-5 * e.abs().max(1.0), "len {len}");
            }
        }
    }
}

/// A rank that leaves in the middle of a large sum makes the others fail with an error
/// (not hang), well before their timeout, and their later calls fail at once.
#[test]
fn a_rank_leaving_mid_call_fails_the_others() {
    let mut group = TcpRing::loopback(3, 12, Duration::from_secs(60)).unwrap();
    let leaver = group.pop().unwrap();
    let start = std::time::Instant::now();
    let handles: Vec<_> = group
        .into_iter()
        .map(|mut ring| {
            std::thread::spawn(move || {
                let mut buf = vec![1.0f32; 64 * PIECE];
                let first = ring.all_reduce_sum(&mut buf).map(|_| ());
                // The ring stays broken: a later call fails at once, not after a timeout.
                let later = ring.all_reduce_sum(&mut buf).expect_err("broken");
                assert!(later.to_string().contains("broke"), "{later}");
                first
            })
        })
        .collect();
    drop(leaver);
    for h in handles {
        let err = h.join().unwrap().expect_err("a peer left");
        assert!(err.to_string().contains("rank"), "{err}");
    }
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_peer_of_another_job_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let stranger_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let peers = vec![
        listener.local_addr().unwrap().to_string(),
        stranger_listener.local_addr().unwrap().to_string(),
    ];
    let secret = random_secret();
    let cfg = |rank, job| RingConfig {
        rank,
        peers: peers.clone(),
        job,
        secret,
        timeout: Duration::from_secs(2),
    };
    let (mine, theirs) = (cfg(0, 1), cfg(1, 2));
    let stranger =
        std::thread::spawn(move || TcpRing::connect(stranger_listener, &theirs).map(|_| ()));
    let err = TcpRing::connect(listener, &mine).err().expect("refused");
    assert!(err.to_string().contains("did not connect"), "{err}");
    assert!(stranger.join().unwrap().is_err());
}

/// Without CUDA's libraries NCCL is refused naming the missing one; where they load, a
/// unique id (NCCL's first call) is made.
#[test]
fn nccl_is_refused_clearly_without_cuda_and_starts_with_it() {
    match nccl::unavailable() {
        Some(_) => {
            let err = nccl::new_id().expect_err("no NCCL here").to_string();
            assert!(err.contains("libcuda") || err.contains("libnccl"), "{err}");
        }
        None => {
            let id = nccl::new_id().expect("NCCL loads: ncclGetUniqueId");
            assert!(id.iter().any(|&b| b != 0), "an all-zero NCCL id");
        }
    }
}

/// Peers named as clusters name them (a DNS name, here `localhost`), resolved when dialing.
#[test]
fn peers_named_by_host_name_form_a_ring() {
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| format!("localhost:{}", l.local_addr().unwrap().port()))
        .collect();
    let ranks = TcpRing::connect_all(listeners, &peers, 9, Duration::from_secs(10)).unwrap();
    let sums: Vec<_> = ranks
        .into_iter()
        .enumerate()
        .map(|(rank, mut ring)| {
            std::thread::spawn(move || {
                let mut v = vec![rank as f32 + 1.0; 5];
                ring.all_reduce_sum(&mut v).unwrap();
                v
            })
        })
        .collect();
    for sum in sums {
        assert_eq!(sum.join().unwrap(), vec![6.0; 5]);
    }
}

#[test]
fn a_peer_whose_name_does_not_resolve_is_named_in_the_error() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = RingConfig {
        rank: 0,
        peers: vec![
            listener.local_addr().unwrap().to_string(),
            "no-such-peer.invalid:7000".into(),
        ],
        job: 3,
        secret: random_secret(),
        timeout: Duration::from_secs(1),
    };
    let err = TcpRing::connect(listener, &cfg)
        .err()
        .expect("no peer")
        .to_string();
    assert!(err.contains("no-such-peer.invalid:7000"), "{err}");
}

/// A peer that knows the job and its predecessor's rank but not the attempt's secret is
/// refused, whichever side it plays.
#[test]
fn a_peer_without_the_secret_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let impostor_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let peers = vec![
        listener.local_addr().unwrap().to_string(),
        impostor_listener.local_addr().unwrap().to_string(),
    ];
    let cfg = |rank, secret| RingConfig {
        rank,
        peers: peers.clone(),
        job: 7,
        secret,
        timeout: Duration::from_secs(2),
    };
    let (mine, theirs) = (cfg(0, random_secret()), cfg(1, random_secret()));
    let impostor =
        std::thread::spawn(move || TcpRing::connect(impostor_listener, &theirs).map(|_| ()));
    let err = TcpRing::connect(listener, &mine).err().expect("refused");
    assert!(err.to_string().contains("did not connect"), "{err}");
    assert!(impostor.join().unwrap().is_err());
}

/// Silent connections to every rank's listener (held open throughout) and an impostor's
/// hello do not keep the real predecessors out: the ring forms and sums.
#[test]
fn silent_sockets_and_impostors_do_not_block_the_ring() {
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let mut silent = Vec::new();
    for addr in &peers {
        for _ in 0..3 {
            silent.push(TcpStream::connect(addr).unwrap());
        }
        // The old, unauthenticated hello of rank 1 for job 4: magic, job, rank.
        let mut old = TcpStream::connect(addr).unwrap();
        let mut hello = 0x7A61_6D31u32.to_le_bytes().to_vec();
        hello.extend(4u64.to_le_bytes());
        hello.extend(1u64.to_le_bytes());
        old.write_all(&hello).unwrap();
        silent.push(old);
    }
    let ranks = TcpRing::connect_all(listeners, &peers, 4, Duration::from_secs(60)).unwrap();
    let sums: Vec<_> = ranks
        .into_iter()
        .enumerate()
        .map(|(rank, mut ring)| {
            std::thread::spawn(move || {
                let mut v = vec![rank as f32 + 1.0; 3];
                ring.all_reduce_sum(&mut v).unwrap();
                v
            })
        })
        .collect();
    for sum in sums {
        assert_eq!(sum.join().unwrap(), vec![3.0; 3]);
    }
    drop(silent);
}
