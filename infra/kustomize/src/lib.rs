//! Kustomize-style composition of the manifests in `infra/k8s`: a `kustomization.yaml` lists
//! `resources` (YAML files, possibly multi-document, or directories with their own
//! kustomization) and `patches` (strategic-merge patches, matched to a resource by kind and
//! name). Maps merge key by key; lists of maps that carry a `name` (containers, ports, env,
//! volumes, mounts) merge item by item on the name; other lists are replaced. That is the
//! subset of kustomize these manifests use; anything else in a kustomization is refused.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

/// Why a kustomization could not be composed; names the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct ComposeError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

fn error(path: &Path, reason: impl ToString) -> ComposeError {
    ComposeError {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_docs(path: &Path) -> Result<Vec<Value>, ComposeError> {
    let text = std::fs::read_to_string(path).map_err(|e| error(path, e))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc).map_err(|e| error(path, e))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The `(kind, metadata.name)` of a resource.
pub fn identity(resource: &Value) -> (String, String) {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    (
        text(resource.get("kind")),
        text(resource.get("metadata").and_then(|m| m.get("name"))),
    )
}

/// Composes the kustomization in `dir`.
pub fn compose(dir: &Path) -> Result<Vec<Value>, ComposeError> {
    let file = dir.join("kustomization.yaml");
    let docs = read_docs(&file)?;
    let k = docs.first().ok_or_else(|| error(&file, "empty"))?;
    let Some(map) = k.as_mapping() else {
        return Err(error(&file, "not a mapping"));
    };
    for key in map.keys() {
        let key = key.as_str().unwrap_or_default();
        if !["apiVersion", "kind", "resources", "patches"].contains(&key) {
            return Err(error(&file, format!("`{key}` is not supported here")));
        }
    }
    let mut out = Vec::new();
    for r in list(k, "resources") {
        let path = dir.join(
            r.as_str()
                .ok_or_else(|| error(&file, "a resource is not a path"))?,
        );
        if path.is_dir() {
            out.extend(compose(&path)?);
        } else {
            out.extend(read_docs(&path)?);
        }
    }
    for p in list(k, "patches") {
        let rel = p
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| error(&file, "a patch without `path`"))?;
        let path = dir.join(rel);
        for patch in read_docs(&path)? {
            let id = identity(&patch);
            let target = out
                .iter_mut()
                .find(|r| identity(r) == id)
                .ok_or_else(|| error(&path, format!("patches {id:?}, which no resource is")))?;
            merge(target, &patch);
        }
    }
    Ok(out)
}

fn list<'a>(v: &'a Value, key: &str) -> Vec<&'a Value> {
    v.get(key)
        .and_then(Value::as_sequence)
        .map(|s| s.iter().collect())
        .unwrap_or_default()
}

fn named(items: &[Value]) -> bool {
    !items.is_empty() && items.iter().all(|i| i.get("name").is_some())
}

/// Strategic merge of `patch` into `target`.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Mapping(t), Value::Mapping(p)) => merge_maps(t, p),
        (Value::Sequence(t), Value::Sequence(p)) if named(t) && named(p) => {
            for item in p {
                match t.iter_mut().find(|x| x.get("name") == item.get("name")) {
                    Some(existing) => merge(existing, item),
                    None => t.push(item.clone()),
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn merge_maps(t: &mut Mapping, p: &Mapping) {
    for (k, v) in p {
        match t.get_mut(k) {
            Some(existing) => merge(existing, v),
            None => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}
