//! A run's metrics: one [`Row`] per optimizer step with the stage's columns, written as
//! `metrics.csv` (read back when a run resumes) and drawn as `loss.png`.

use std::path::Path;

use plotters::prelude::*;

use crate::metrics::StepTiming;

/// The metric columns of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    /// The step's values, in CSV order.
    pub values: &'static [&'static str],
    /// The throughput column (`images_per_s`, `tokens_per_s`).
    pub rate: &'static str,
    /// The validation columns, filled at evaluation steps; the first is the one a run's
    /// summary and `loss.png` follow.
    pub val: Vec<String>,
    /// The training columns `loss.png` draws beside the validation curve.
    pub plotted: &'static [&'static str],
}

impl Columns {
    /// The CSV header.
    pub fn header(&self) -> String {
        let mut names = vec!["step"];
        names.extend(self.values);
        names.push(self.rate);
        names.extend(self.val.iter().map(String::as_str));
        names.join(",")
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.values.iter().position(|n| *n == name)
    }
}

/// One row of `metrics.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Step after the update.
    pub step: u64,
    /// The stage's values, in [`Columns::values`] order.
    pub values: Vec<f64>,
    /// Training samples (images or tokens) per second.
    pub rate: f64,
    /// The validation metrics (one per [`Columns::val`]) when evaluated at this step.
    pub val: Option<Vec<f64>>,
    /// Where the step's time went (not in the CSV).
    pub timing: StepTiming,
}

impl Row {
    /// The value of column `name` (of `columns`), if it has one.
    pub fn get(&self, columns: &Columns, name: &str) -> Option<f64> {
        columns.index(name).map(|i| self.values[i])
    }

    /// The values with their names, then the validation values when there are any (those
    /// not measured at this step, `NaN`, left out).
    pub fn named<'a>(&self, columns: &'a Columns) -> Vec<(&'a str, f64)> {
        let mut out: Vec<(&str, f64)> = columns
            .values
            .iter()
            .copied()
            .zip(self.values.iter().copied())
            .collect();
        if let Some(val) = &self.val {
            out.extend(
                columns
                    .val
                    .iter()
                    .map(String::as_str)
                    .zip(val.iter().copied())
                    .filter(|(_, v)| !v.is_nan()),
            );
        }
        out
    }

    /// The first validation metric, when evaluated.
    pub fn first_val(&self) -> Option<f64> {
        self.val.as_ref().and_then(|v| v.first().copied())
    }

    /// The CSV line (no newline).
    pub fn csv_line(&self, columns: &Columns) -> String {
        let mut fields = vec![self.step.to_string()];
        fields.extend(self.values.iter().map(f64::to_string));
        fields.push(self.rate.to_string());
        match &self.val {
            Some(val) => fields.extend(val.iter().map(f64::to_string)),
            None => fields.extend(columns.val.iter().map(|_| String::new())),
        }
        fields.join(",")
    }
}

/// Writes all rows as CSV (values in Rust's shortest exact form), atomically.
pub fn write_csv(
    path: &Path,
    columns: &Columns,
    rows: &[Row],
) -> Result<(), taming_model::ModelError> {
    let mut text = columns.header();
    text.push('\n');
    for r in rows {
        text.push_str(&r.csv_line(columns));
        text.push('\n');
    }
    taming_model::atomic::write(path, text.as_bytes())
}

/// Rows written by [`write_csv`] with the same header (for resuming a run's curve); a
/// missing file or another header gives none, lines that do not parse are left out.
pub fn read_csv(path: &Path, columns: &Columns) -> Vec<Row> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut lines = text.lines();
    if lines.next() != Some(columns.header().as_str()) {
        return Vec::new();
    }
    let width = columns.values.len();
    let parse =
        |fields: &[&str]| -> Option<Vec<f64>> { fields.iter().map(|v| v.parse().ok()).collect() };
    lines
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() != width + 2 + columns.val.len() {
                return None;
            }
            Some(Row {
                step: f[0].parse().ok()?,
                values: parse(&f[1..=width])?,
                rate: f[width + 1].parse().ok()?,
                val: parse(&f[width + 2..]),
                timing: StepTiming::default(),
            })
        })
        .collect()
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Plots the [`Columns::plotted`] training values and the validation value against the step
/// as a PNG, written beside its name and renamed.
pub fn plot_losses(path: &Path, columns: &Columns, rows: &[Row]) -> Result<(), String> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut series: Vec<(String, Vec<(u64, f64)>)> = columns
        .plotted
        .iter()
        .map(|name| {
            let points = rows
                .iter()
                .filter_map(|r| r.get(columns, name).map(|v| (r.step, v)))
                .collect();
            (format!("train {name}"), points)
        })
        .collect();
    let val = rows
        .iter()
        .filter_map(|r| r.first_val().map(|v| (r.step, v)));
    let val_name = columns.val.first().map_or("validation", String::as_str);
    series.push((val_name.replace('_', " "), val.collect()));
    let tmp = path.with_file_name(format!(".loss.tmp-{}.png", std::process::id()));
    draw(&tmp, &series).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

type Series = (String, Vec<(u64, f64)>);

fn draw(path: &Path, series: &[Series]) -> Result<(), Box<dyn std::error::Error>> {
    let with_text = register_font();
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let max_step = points.clone().map(|p| p.0).max().unwrap_or(1).max(1);
    let max_y = points
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.05;
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60);
    if with_text {
        builder.caption("losses", ("sans-serif", 22));
    }
    let mut chart = builder.build_cartesian_2d(0u64..max_step, 0.0..max_y)?;
    let mut mesh = chart.configure_mesh();
    if !with_text {
        mesh.disable_x_mesh()
            .disable_y_mesh()
            .x_labels(0)
            .y_labels(0);
    }
    mesh.x_desc("step").y_desc("loss").draw()?;
    let colors = [BLUE, GREEN, MAGENTA, CYAN, RED];
    for (i, (name, points)) in series.iter().enumerate() {
        // The validation curve (last) is always red.
        let color = if i + 1 == series.len() {
            RED
        } else {
            colors[i % 4]
        };
        let drawn = chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
        if with_text {
            drawn
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    if with_text {
        chart
            .configure_series_labels()
            .background_style(WHITE)
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Registers DejaVu Sans for chart text; false when the font is not installed.
fn register_font() -> bool {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let Ok(bytes) = std::fs::read(FONT) else {
            return false;
        };
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns() -> Columns {
        Columns {
            values: &["loss", "lr"],
            rate: "tokens_per_s",
            val: vec!["val_loss".into(), "val_acc".into()],
            plotted: &["loss"],
        }
    }

    #[test]
    fn rows_round_trip_exactly_through_the_csv() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        let rows = vec![
            Row {
                step: 1,
                values: vec![0.1 + 0.2, 3e-4],
                rate: 1234.5,
                val: None,
                timing: StepTiming::default(),
            },
            Row {
                step: 2,
                values: vec![1.0 / 3.0, 2.5e-4],
                rate: 99.0,
                val: Some(vec![0.7, 0.5]),
                timing: StepTiming::default(),
            },
        ];
        let columns = columns();
        write_csv(&path, &columns, &rows).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("step,loss,lr,tokens_per_s,val_loss,val_acc\n1,"),
            "{text}"
        );
        assert!(
            text.contains("\n1,0.30000000000000004,0.0003,1234.5,,\n"),
            "{text}"
        );
        assert_eq!(read_csv(&path, &columns), rows);
        let other = Columns {
            values: &["l1"],
            ..columns.clone()
        };
        assert!(
            read_csv(&path, &other).is_empty(),
            "another header is not read"
        );
        plot_losses(&dir.path().join("loss.png"), &columns, &rows).unwrap();
        let png = image::open(dir.path().join("loss.png")).unwrap();
        assert_eq!((png.width(), png.height()), (800, 500));
    }

    #[test]
    fn named_values_follow_the_columns_and_add_validation() {
        let row = Row {
            step: 3,
            values: vec![2.0, 0.5],
            rate: 1.0,
            val: Some(vec![1.5, 0.25]),
            timing: StepTiming::default(),
        };
        let columns = columns();
        assert_eq!(
            row.named(&columns),
            vec![
                ("loss", 2.0),
                ("lr", 0.5),
                ("val_loss", 1.5),
                ("val_acc", 0.25)
            ]
        );
        assert_eq!(row.get(&columns, "lr"), Some(0.5));
        assert_eq!(row.get(&columns, "l1"), None);
        assert_eq!(row.first_val(), Some(1.5));
    }
}
