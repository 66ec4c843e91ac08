//! The code Parquet as docs/data.md describes it, read by pyarrow (PyPI): its column types
//! and nullability, row groups of 4,096 rows, Snappy compression, and the values written.

use taming_dataloader::codes::{CodeRow, join, write_codes};
use taming_tests::python;

/// Schema, row groups, codecs and values as pyarrow reads them, as JSON.
const PYARROW: &str = r#"
import json, sys
import pyarrow.parquet as pq
f = pq.ParquetFile(sys.argv[1])
meta = f.metadata
schema = f.schema_arrow
table = f.read()
print(json.dumps({
    "fields": [[x.name, str(x.type), x.nullable] for x in schema],
    "row_groups": [meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
    "codecs": sorted({meta.row_group(i).column(j).compression
                      for i in range(meta.num_row_groups) for j in range(meta.num_columns)}),
    "rows": table.slice(0, 3).to_pylist() + table.slice(table.num_rows - 1).to_pylist(),
}))
"#;

fn rows(n: usize) -> Vec<CodeRow> {
    (0..n)
        .map(|i| CodeRow {
            key: format!("sample-{i:05}"),
            codes: (0..6).map(|j| ((i * 31 + j * 7) % 1024) as i32).collect(),
            height: 2,
            width: 3,
            label: (i % 3 != 0).then_some(i as i64 % 10),
            cond_codes: (i % 2 == 0).then(|| vec![i as i32; 6]),
            shard: "s3://b/train-000.tar".into(),
        })
        .collect()
}

#[test]
fn pyarrow_reads_the_documented_schema_row_groups_and_compression() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_string_lossy().into_owned();
    let url = join(&dir, "codes.parquet");
    let written = rows(9000);
    write_codes(&url, &written).unwrap();
    let report = python::run(PYARROW, &[url]);
    let got: serde_json::Value = serde_json::from_str(&report).unwrap();

    let fields: Vec<(String, String, bool)> =
        serde_json::from_value(got["fields"].clone()).unwrap();
    let expected = [
        ("key", "string", false),
        ("codes", "list<element: int32 not null>", false),
        ("height", "int32", false),
        ("width", "int32", false),
        ("label", "int64", true),
        ("cond_codes", "list<element: int32 not null>", true),
        ("shard", "string", false),
    ];
    assert_eq!(fields.len(), expected.len(), "{fields:?}");
    for ((name, ty, nullable), (e_name, e_ty, e_null)) in fields.iter().zip(expected) {
        assert_eq!(name, e_name);
        // pyarrow names a list's item `item` or `element` after the writer.
        let ty = ty.replace("<item:", "<element:");
        assert_eq!(ty, e_ty, "{name}");
        if !e_null {
            assert!(!nullable, "{name} is nullable");
        }
    }
    assert_eq!(got["row_groups"], serde_json::json!([4096, 4096, 808]));
    assert_eq!(got["codecs"], serde_json::json!(["SNAPPY"]));

    let read = got["rows"].as_array().unwrap();
    for (value, row) in read.iter().zip([0, 1, 2, 8999].map(|i| &written[i])) {
        assert_eq!(value["key"], row.key.as_str());
        assert_eq!(value["codes"], serde_json::json!(row.codes));
        assert_eq!(
            (value["height"].clone(), value["width"].clone()),
            (2.into(), 3.into())
        );
        assert_eq!(value["label"], serde_json::json!(row.label));
        assert_eq!(value["cond_codes"], serde_json::json!(row.cond_codes));
        assert_eq!(value["shard"], row.shard.as_str());
    }
}
