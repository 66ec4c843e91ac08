//! Code-index Parquet for stage 2: one row per image with its key, VQGAN codes, token grid
//! size, class label, cond-stage codes and source shard. Files are uploaded whole (multipart
//! above [`PART_BYTES`]) so none is ever visible half-written, and `_manifest.json`, listing
//! every file and its row count, is written last.

use std::sync::Arc;

use arrow_array::builder::{Int32Builder, Int64Builder, ListBuilder, StringBuilder};
use arrow_array::{Array, ArrayRef, Int32Array, Int64Array, ListArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use object_store::ObjectStoreExt;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::runtime;
use crate::source::locate;

/// Uploads larger than this go as multipart uploads of parts this size.
pub const PART_BYTES: usize = 5 << 20;
/// Rows per Parquet row group (streaming readers hold one group at a time).
pub const ROW_GROUP_ROWS: usize = 4096;
/// The manifest's file name.
pub const MANIFEST: &str = "_manifest.json";

/// One encoded image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRow {
    /// Sample key.
    pub key: String,
    /// Code indices, row-major over the token grid.
    pub codes: Vec<i32>,
    /// Token grid height.
    pub height: i32,
    /// Token grid width.
    pub width: i32,
    /// Class label.
    pub label: Option<i64>,
    /// Codes of the conditioning (e.g. segmentation) VQGAN.
    pub cond_codes: Option<Vec<i32>>,
    /// The shard the sample came from.
    pub shard: String,
}

/// A file listed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// File name, relative to the manifest.
    pub path: String,
    /// Rows in it.
    pub rows: u64,
}

/// `_manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Every Parquet file of the set.
    pub files: Vec<ManifestFile>,
    /// Total rows.
    pub rows: u64,
}

/// The Arrow schema of code files.
pub fn schema() -> SchemaRef {
    let list = |name| {
        Field::new(
            name,
            DataType::List(Arc::new(Field::new("item", DataType::Int32, false))),
            name == "cond_codes",
        )
    };
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        list("codes"),
        Field::new("height", DataType::Int32, false),
        Field::new("width", DataType::Int32, false),
        Field::new("label", DataType::Int64, true),
        list("cond_codes"),
        Field::new("shard", DataType::Utf8, false),
    ]))
}

fn to_batch(rows: &[CodeRow]) -> RecordBatch {
    let item = Arc::new(Field::new("item", DataType::Int32, false));
    let mut codes = ListBuilder::new(Int32Builder::new()).with_field(item.clone());
    let mut cond = ListBuilder::new(Int32Builder::new()).with_field(item);
    let mut label = Int64Builder::new();
    for r in rows {
        codes.append_value(r.codes.iter().map(|&c| Some(c)));
        match &r.cond_codes {
            Some(c) => cond.append_value(c.iter().map(|&c| Some(c))),
            None => cond.append_null(),
        }
        label.append_option(r.label);
    }
    let strings = |f: fn(&CodeRow) -> &str| {
        let mut b = StringBuilder::new();
        rows.iter().for_each(|r| b.append_value(f(r)));
        Arc::new(b.finish()) as ArrayRef
    };
    let ints = |f: fn(&CodeRow) -> i32| {
        Arc::new(Int32Array::from_iter_values(rows.iter().map(f))) as ArrayRef
    };
    RecordBatch::try_new(
        schema(),
        vec![
            strings(|r| &r.key),
            Arc::new(codes.finish()),
            ints(|r| r.height),
            ints(|r| r.width),
            Arc::new(label.finish()),
            Arc::new(cond.finish()),
            strings(|r| &r.shard),
        ],
    )
    .expect("rows match the schema")
}

/// Encodes rows as one Parquet file in memory.
pub fn encode_parquet(rows: &[CodeRow]) -> Result<Vec<u8>, DataError> {
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let err = |e: parquet::errors::ParquetError| DataError::Write {
        target: "parquet".into(),
        reason: e.to_string(),
    };
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, schema(), Some(props)).map_err(err)?;
    for chunk in rows.chunks(ROW_GROUP_ROWS) {
        writer.write(&to_batch(chunk)).map_err(err)?;
    }
    writer.close().map_err(err)?;
    Ok(out)
}

/// Uploads `data` to `url` whole: a single PUT, or a multipart upload above [`PART_BYTES`]
/// that is aborted on failure. The object is visible only once complete.
pub fn upload(url: &str, data: Bytes) -> Result<(), DataError> {
    let loc = locate(url)?;
    let err = |e: object_store::Error| DataError::Write {
        target: url.to_string(),
        reason: e.to_string(),
    };
    runtime::block_on(async move {
        if data.len() <= PART_BYTES {
            return loc.store.put(&loc.path, data.into()).await.map(drop);
        }
        let mut upload = loc.store.put_multipart(&loc.path).await?;
        let mut sent = async {
            for (i, start) in (0..data.len()).step_by(PART_BYTES).enumerate() {
                let end = (start + PART_BYTES).min(data.len());
                upload.put_part(data.slice(start..end).into()).await?;
                crate::failpoint::after_part(i + 1);
            }
            upload.complete().await.map(drop)
        }
        .await;
        if sent.is_err() && upload.abort().await.is_err() {
            tracing::warn!(%url, "could not abort the failed multipart upload");
        }
        std::mem::replace(&mut sent, Ok(()))
    })
    .map_err(err)
}

/// Reads an object whole.
pub fn download(url: &str) -> Result<Bytes, DataError> {
    let loc = locate(url)?;
    let err = |e: object_store::Error| DataError::Shard {
        shard: url.into(),
        reason: e.to_string(),
    };
    runtime::block_on(async move { loc.store.get(&loc.path).await?.bytes().await }).map_err(err)
}

/// Writes `rows` to `url` as Parquet.
pub fn write_codes(url: &str, rows: &[CodeRow]) -> Result<(), DataError> {
    upload(url, encode_parquet(rows)?.into())
}

/// Reads a code Parquet file.
pub fn read_codes(url: &str) -> Result<Vec<CodeRow>, DataError> {
    let bad = |reason: String| DataError::Shard {
        shard: url.into(),
        reason,
    };
    let data = download(url)?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(data)
        .and_then(|b| b.build())
        .map_err(|e| bad(e.to_string()))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(e.to_string()))?;
        rows.extend(from_batch(&batch).map_err(bad)?);
    }
    Ok(rows)
}

fn column<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T, String> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| format!("column `{name}` is missing or has the wrong type"))
}

fn from_batch(b: &RecordBatch) -> Result<Vec<CodeRow>, String> {
    let key = column::<StringArray>(b, "key")?;
    let codes = column::<ListArray>(b, "codes")?;
    let height = column::<Int32Array>(b, "height")?;
    let width = column::<Int32Array>(b, "width")?;
    let label = column::<Int64Array>(b, "label")?;
    let cond = column::<ListArray>(b, "cond_codes")?;
    let shard = column::<StringArray>(b, "shard")?;
    let ints = |l: &ListArray, i: usize| -> Result<Vec<i32>, String> {
        let v = l.value(i);
        let v = v
            .as_any()
            .downcast_ref::<Int32Array>()
            .ok_or("codes are not int32")?;
        Ok(v.values().to_vec())
    };
    (0..b.num_rows())
        .map(|i| {
            Ok(CodeRow {
                key: key.value(i).to_string(),
                codes: ints(codes, i)?,
                height: height.value(i),
                width: width.value(i),
                label: (!label.is_null(i)).then(|| label.value(i)),
                cond_codes: (!cond.is_null(i)).then(|| ints(cond, i)).transpose()?,
                shard: shard.value(i).to_string(),
            })
        })
        .collect()
}

/// Joins a directory URL and a file name.
pub fn join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

/// Writes the manifest (last, after every file it lists).
pub fn write_manifest(dir: &str, files: Vec<ManifestFile>) -> Result<Manifest, DataError> {
    let manifest = Manifest {
        rows: files.iter().map(|f| f.rows).sum(),
        files,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    upload(&join(dir, MANIFEST), json.into())?;
    Ok(manifest)
}

/// Reads `_manifest.json` of a code set.
pub fn read_manifest(dir: &str) -> Result<Manifest, DataError> {
    let url = join(dir, MANIFEST);
    let data = download(&url)?;
    serde_json::from_slice(&data).map_err(|e| DataError::Shard {
        shard: url.into(),
        reason: format!("not a manifest: {e}"),
    })
}
