//! The dataloader service's request check on arbitrary protobuf bytes: every request that
//! decodes is accepted or refused naming a field, before any allocation it asks for (shard
//! patterns, batch bytes, the resume state).
#![no_main]

use prost::Message;
use taming_dataloader::service::check_request;
use taming_dataloader::shards::DataRoots;
use taming_proto::dataloader::StreamRequest;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(request) = StreamRequest::decode(data) else {
        return;
    };
    let roots = DataRoots::new([std::env::temp_dir()]).expect("the temporary folder");
    let _ = check_request(request, &roots);
});
