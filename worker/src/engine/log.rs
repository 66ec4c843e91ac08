//! Rank 0's record of a run as it happens: `metrics.csv` appended row by row (cut back to the
//! checkpoint's step when a run resumes), the same rows as TensorBoard scalars with the
//! pictures as images, and `loss.png` at the end. Other ranks record nothing.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::rows::{self, Columns, Row};
use super::{Picture, RunError, output};
use crate::tensorboard::EventWriter;

/// The open metrics of a run (rank 0), or nothing (other ranks).
pub(super) struct MetricsLog {
    open: Option<Open>,
}

struct Open {
    out: PathBuf,
    columns: Columns,
    rows: Vec<Row>,
    csv: File,
    events: EventWriter,
}

impl MetricsLog {
    /// Opens the metrics of the run folder `out` at `step` (rows after it, written by an
    /// attempt that did not reach its next checkpoint, are cut); nothing unless `lead`.
    pub(super) fn open(
        out: &Path,
        columns: &Columns,
        step: u64,
        lead: bool,
    ) -> Result<Self, RunError> {
        if !lead {
            return Ok(Self { open: None });
        }
        let path = out.join("metrics.csv");
        let rows: Vec<Row> = rows::read_csv(&path, columns)
            .into_iter()
            .filter(|r| r.step <= step)
            .collect();
        rows::write_csv(&path, columns, &rows).map_err(|e| output(&path, e))?;
        let csv = File::options()
            .append(true)
            .open(&path)
            .map_err(|e| output(&path, e))?;
        let tb = out.join("tb");
        let events = EventWriter::create(&tb).map_err(|e| output(&tb, e))?;
        let open = Open {
            out: out.to_path_buf(),
            columns: columns.clone(),
            rows,
            csv,
            events,
        };
        Ok(Self { open: Some(open) })
    }

    /// Records a step's row.
    pub(super) fn append(&mut self, row: &Row) -> Result<(), RunError> {
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        let line = format!("{}\n", row.csv_line(&open.columns));
        let csv = open.out.join("metrics.csv");
        open.csv
            .write_all(line.as_bytes())
            .and_then(|()| open.csv.flush())
            .map_err(|e| output(&csv, e))?;
        let mut scalars = row.named(&open.columns);
        scalars.push((open.columns.rate, row.rate));
        let tb = open.events.path().to_path_buf();
        open.events
            .scalars(row.step, &scalars)
            .map_err(|e| output(&tb, e))?;
        open.rows.push(row.clone());
        Ok(())
    }

    /// Forgets the rows after `step` (the run went back to a checkpoint there).
    pub(super) fn rewind(&mut self, step: u64) -> Result<(), RunError> {
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        open.rows.retain(|r| r.step <= step);
        let path = open.out.join("metrics.csv");
        rows::write_csv(&path, &open.columns, &open.rows).map_err(|e| output(&path, e))?;
        open.csv = File::options()
            .append(true)
            .open(&path)
            .map_err(|e| output(&path, e))?;
        Ok(())
    }

    /// Records pictures at `step` (TensorBoard images).
    pub(super) fn pictures(&mut self, step: u64, pictures: &[Picture]) -> Result<(), RunError> {
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        let tb = open.events.path().to_path_buf();
        for (name, picture) in pictures {
            let mut png = Vec::new();
            picture
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| output(&tb, e))?;
            let size = (picture.width(), picture.height(), png);
            open.events
                .png(step, name, size)
                .map_err(|e| output(&tb, e))?;
        }
        Ok(())
    }

    /// Draws `loss.png` from every row.
    pub(super) fn finish(&self) -> Result<(), RunError> {
        let Some(open) = self.open.as_ref() else {
            return Ok(());
        };
        let png = open.out.join("loss.png");
        rows::plot_losses(&png, &open.columns, &open.rows).map_err(|e| output(&png, e))
    }
}
