//! Communication as a share of step time: the default stage-1 config
//! (configs/stage1/fashion_mnist.yaml, batch 16 per rank) on 2 ranks in this process,
//! averaging gradients over the loopback TCP ring; with `--disc`, from the first step on the
//! discriminator trains too (`disc_start: 0`), and with `--no-overlap` every collective
//! completes before the trainer goes on (no mean runs behind the discriminator's compute).
//! The share reported is the time the trainer waits for collectives.
//! `cargo bench -p taming-worker --bench data_parallel -- [--steps 8] [--disc] [--no-overlap]`

use std::time::{Duration, Instant};

use burn::tensor::Device;
use taming_collective::TcpRing;
use taming_dataloader::shards::list_split;
use taming_dataloader::{LoaderConfig, LoaderState, Preprocess, ShardLoader};
use taming_worker::defaults::{default_data, parse_config};
use taming_worker::learner::Group;
use taming_worker::stage1::Stage1Trainer;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .map_or(8, |v| v.parse().unwrap());
    let mut config = parse_config("", "").unwrap();
    if args.iter().any(|a| a == "--disc") {
        config.loss.disc_start = 0;
    }
    let overlap = !args.iter().any(|a| a == "--no-overlap");
    let device = Device::flex().autodiff();
    let trainers: Vec<Stage1Trainer> = (0..2)
        .map(|_| Stage1Trainer::new(config.clone(), 2, &device).unwrap())
        .collect();
    let rings = TcpRing::loopback(2, 9, Duration::from_secs(120)).unwrap();
    let shards = list_split(default_data().unwrap(), "train").unwrap();
    let handles: Vec<_> = trainers
        .into_iter()
        .zip(rings)
        .enumerate()
        .map(|(rank, (trainer, ring))| {
            let shards = shards.clone();
            let batch = config.batch_size;
            std::thread::spawn(move || {
                let mut trainer = trainer
                    .join_group(Group::with_overlap(Box::new(ring), overlap))
                    .unwrap();
                let pre = Preprocess {
                    size: 32,
                    random_crop: true,
                    flip: false,
                };
                let mut lc = LoaderConfig::simple(batch, pre, 0, true);
                lc.reader.rank = rank;
                lc.reader.world_size = 2;
                let mut loader = ShardLoader::open(&shards, lc, &LoaderState::default()).unwrap();
                let mut step = |t: Stage1Trainer| {
                    let b = loader.next_batch().unwrap();
                    let x = t.to_tensor(&b);
                    t.train_batch(x, None).unwrap().0
                };
                trainer = step(trainer); // warm-up
                let comm0 = trainer.comm_time();
                let start = Instant::now();
                for _ in 0..steps {
                    trainer = step(trainer);
                }
                (start.elapsed(), trainer.comm_time() - comm0)
            })
        })
        .collect();
    for (rank, h) in handles.into_iter().enumerate() {
        let (total, comm) = h.join().unwrap();
        println!(
            "rank {rank}: {:.0} ms/step, waiting for collectives {:.1} ms/step ({:.1}% of the step; includes waiting for the slower rank)",
            total.as_secs_f64() * 1e3 / steps as f64,
            comm.as_secs_f64() * 1e3 / steps as f64,
            100.0 * comm.as_secs_f64() / total.as_secs_f64()
        );
    }
}
