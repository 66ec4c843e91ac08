//! Images and label maps whose size would make the loader allocate without bound are skipped
//! from their headers (counted, like other unusable samples) and the rest of their shard is
//! read, with the process staying small. Its own test binary, so that the memory measured is
//! this test's alone.

mod common;

use common::{config, mask_png, peak_rss, png_from, png_header_claiming, put_shard, sequential};
use rand::SeedableRng;
use taming_dataloader::label_map;
use taming_dataloader::runtime;
use taming_dataloader::service::serve_listener;
use taming_dataloader::{LoaderState, Preprocess, ShardLoader};
use taming_proto::dataloader::StreamRequest;
use taming_proto::dataloader::dataloader_client::DataloaderClient;

/// A 1 x 100000 PNG: 100000 pixels to decode, but 256 x 25600000 (19.7 GB of RGB) once its
/// shorter side is resized to 256.
fn tall_png() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::GrayImage::new(1, 100_000)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

#[test]
fn oversized_images_and_label_maps_are_skipped_from_their_headers() {
    let good = png_from(8, 8, |x, y| [x as u8, y as u8, 7]);
    let seg = mask_png(8, 8, |x, _| x as u8);
    let tall = tall_png();
    // A label map claiming 60000 x 60000 (3.6 GB), beside an image of that size and of 8 x 8.
    let (huge_map, huge_image) = (
        png_header_claiming(60_000, 60_000, 0),
        png_header_claiming(60_000, 60_000, 2),
    );
    // Why each is refused, as the skip warnings say.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut out = vec![0u8; 3 * 256 * 256];
    let mut why = |image: &[u8], mask: Option<&[u8]>| {
        let pre = Preprocess {
            size: 256,
            random_crop: false,
            flip: false,
        };
        pre.apply_into(image, mask, &mut rng, &mut out).unwrap_err()
    };
    let e = why(&tall, None);
    assert!(e.contains("1x100000 would be 256x25600000"), "{e}");
    let e = why(&huge_image, None);
    assert!(e.contains("image: 60000x60000"), "{e}");
    let e = why(&good, Some(&huge_map));
    assert!(
        e.contains("label map is 60000x60000 but its image is 8x8"),
        "{e}"
    );
    let e = label_map::decode(&huge_map).unwrap_err();
    assert!(e.contains("label map: 60000x60000"), "{e}");
    put_shard(
        "memory://oversized/train-0.tar",
        &[("a.png", &good), ("tall.png", &tall), ("b.png", &good)],
    );
    put_shard(
        "memory://oversized/train-1.tar",
        &[
            ("c.png", &good),
            ("c.seg.png", &seg),
            ("huge.png", &good),
            ("huge.seg.png", &huge_map),
            ("d.png", &good),
            ("d.seg.png", &seg),
            ("wide.png", &huge_image),
            ("wide.seg.png", &huge_map),
            ("e.png", &good),
            ("e.seg.png", &seg),
        ],
    );
    let urls: Vec<String> = (0..2)
        .map(|i| format!("memory://oversized/train-{i}.tar"))
        .collect();
    let mut cfg = config(16, sequential());
    cfg.preprocess.size = 256;
    let mut loader = ShardLoader::open(&urls, cfg, &LoaderState::default()).unwrap();
    let batch = loader.next_in_epoch().unwrap().unwrap();
    assert_eq!(batch.keys, ["a", "b", "c", "d", "e"]);
    assert_eq!(loader.skipped(), 3, "tall, huge and wide");
    assert!(loader.next_in_epoch().unwrap().is_none());

    // Through the service: the same samples skipped and counted, and it goes on serving.
    let listener = runtime::block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    runtime::io().spawn(serve_listener(listener, std::future::pending()));
    for _ in 0..2 {
        let request = StreamRequest {
            shards: urls.clone(),
            world_size: 1,
            batch_size: 5,
            size: 256,
            max_batches: 1,
            ..Default::default()
        };
        let addr = addr.clone();
        let batch = runtime::block_on(async move {
            let mut client = DataloaderClient::connect(addr)
                .await
                .unwrap()
                .max_decoding_message_size(64 << 20);
            let mut stream = client.stream_batches(request).await.unwrap().into_inner();
            stream.message().await.unwrap().expect("a batch")
        });
        assert_eq!(batch.keys, ["a", "b", "c", "d", "e"]);
        assert_eq!(batch.skipped, 3);
    }

    let peak = peak_rss();
    assert!(peak < 1 << 30, "peak RSS {peak} bytes");
}
