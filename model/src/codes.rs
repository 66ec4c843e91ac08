//! `codes.json`: a grid of code indices, `{"indices": [[...], ...]}`, one list per token row.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// A token grid of one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeGrid {
    /// Rows of code indices.
    pub indices: Vec<Vec<i64>>,
}

impl CodeGrid {
    /// The first image's grid of an index tensor `[b, h, w]`.
    pub fn from_tensor(indices: Tensor<3, Int>) -> Self {
        let [_, h, w] = indices.dims();
        let flat: Vec<i64> = indices
            .narrow(0, 0, 1)
            .try_into_vec_as::<i64>()
            .expect("int data");
        Self {
            indices: flat.chunks(w).take(h).map(<[i64]>::to_vec).collect(),
        }
    }

    /// Reads and parses a `codes.json`; the error names the file.
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| ModelError::file(path, format!("not a codes file ({e})")))
    }

    /// Writes the grid as JSON, atomically.
    pub fn write(&self, path: &Path) -> Result<(), ModelError> {
        let json = serde_json::to_string(self).expect("codes serialize");
        crate::atomic::write(path, json.as_bytes())
    }

    /// `[1, h, w]` indices after checking the grid is rectangular and every code is below
    /// `n_embed`; errors name `path` and the offending position.
    pub fn to_tensor(
        &self,
        n_embed: usize,
        path: &Path,
        device: &Device,
    ) -> Result<Tensor<3, Int>, ModelError> {
        let h = self.indices.len();
        let w = self.indices.first().map_or(0, Vec::len);
        if h == 0 || w == 0 {
            return Err(ModelError::file(path, "`indices` is empty"));
        }
        for (r, row) in self.indices.iter().enumerate() {
            if row.len() != w {
                return Err(ModelError::file(
                    path,
                    format!("`indices` row {r} has {} codes, row 0 has {w}", row.len()),
                ));
            }
            if let Some((c, v)) = row
                .iter()
                .enumerate()
                .find(|(_, v)| !(0..n_embed as i64).contains(v))
            {
                return Err(ModelError::file(
                    path,
                    format!("`indices[{r}][{c}]` = {v} is outside 0..{n_embed}"),
                ));
            }
        }
        let flat: Vec<i64> = self.indices.concat();
        Ok(Tensor::from_data(TensorData::new(flat, [1, h, w]), device))
    }
}
