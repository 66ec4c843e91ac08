//! What a run leaves for people: `metrics.csv`, a loss-curve PNG and a grid of validation
//! inputs beside their reconstructions. Every file is written beside its name and renamed.

use std::path::Path;

use image::RgbImage;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// One row of `metrics.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRow {
    /// Step after the update.
    pub step: u64,
    /// Total generator loss.
    pub total: f64,
    /// Reconstruction term (L1 + perceptual).
    pub nll: f64,
    /// Mean L1.
    pub l1: f64,
    /// Mean LPIPS.
    pub p_loss: f64,
    /// Quantizer loss.
    pub quant: f64,
    /// Generator GAN loss.
    pub g_loss: f64,
    /// Discriminator loss (0 before disc_start).
    pub d_loss: f64,
    /// Adaptive GAN weight (lambda).
    pub d_weight: f64,
    /// Codebook usage over the recent-token window.
    pub usage: f64,
    /// Training images per second.
    pub images_per_s: f64,
    /// Validation L1 when evaluated at this step, else empty.
    pub val_l1: Option<f64>,
    /// Where the step's time went (not in the CSV).
    #[serde(skip)]
    pub timing: crate::metrics::StepTiming,
}

const HEADER: &str =
    "step,total,nll,l1,p_loss,quant,g_loss,d_loss,d_weight,usage,images_per_s,val_l1";

/// Writes all rows as CSV.
pub fn write_csv(path: &Path, rows: &[MetricsRow]) -> Result<(), taming_model::ModelError> {
    let mut text = String::from(HEADER);
    text.push('\n');
    for r in rows {
        let val = r.val_l1.map(|v| format!("{v:.6}")).unwrap_or_default();
        text.push_str(&format!(
            "{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.3},{val}\n",
            r.step,
            r.total,
            r.nll,
            r.l1,
            r.p_loss,
            r.quant,
            r.g_loss,
            r.d_loss,
            r.d_weight,
            r.usage,
            r.images_per_s
        ));
    }
    taming_model::atomic::write(path, text.as_bytes())
}

/// Reads rows written by [`write_csv`] (for resuming a run's curve).
pub fn read_csv(path: &Path) -> std::io::Result<Vec<MetricsRow>> {
    let text = std::fs::read_to_string(path)?;
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 12 {
            continue;
        }
        let n = |i: usize| f[i].parse::<f64>().unwrap_or(0.0);
        rows.push(MetricsRow {
            step: f[0].parse().unwrap_or(0),
            total: n(1),
            nll: n(2),
            l1: n(3),
            p_loss: n(4),
            quant: n(5),
            g_loss: n(6),
            d_loss: n(7),
            d_weight: n(8),
            usage: n(9),
            images_per_s: n(10),
            val_l1: f[11].parse().ok(),
            timing: Default::default(),
        });
    }
    Ok(rows)
}

/// Which value of a row a curve shows.
type Pick = fn(&MetricsRow) -> Option<f64>;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Plots training L1, reconstruction loss and validation L1 against the step as a PNG.
pub fn plot_losses(path: &Path, rows: &[MetricsRow]) -> Result<(), String> {
    if rows.is_empty() {
        return Ok(());
    }
    let with_text = register_font();
    let tmp = path.with_file_name(format!(".loss.tmp-{}.png", std::process::id()));
    {
        let root = BitMapBackend::new(&tmp, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let max_step = rows.last().map_or(1, |r| r.step).max(1);
        let max_y = rows
            .iter()
            .map(|r| r.nll.max(r.l1))
            .fold(0.0, f64::max)
            .max(1e-3)
            * 1.05;
        let mut builder = ChartBuilder::on(&root);
        builder
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60);
        if with_text {
            builder.caption("stage-1 losses", ("sans-serif", 22));
        }
        let mut chart = builder
            .build_cartesian_2d(0u64..max_step, 0.0..max_y)
            .map_err(|e| e.to_string())?;
        let mut mesh = chart.configure_mesh();
        if !with_text {
            mesh.disable_x_mesh()
                .disable_y_mesh()
                .x_labels(0)
                .y_labels(0);
        }
        mesh.x_desc("step")
            .y_desc("loss")
            .draw()
            .map_err(|e| e.to_string())?;
        let series: [(&str, RGBColor, Pick); 3] = [
            ("train L1", BLUE, |r| Some(r.l1)),
            ("train nll", GREEN, |r| Some(r.nll)),
            ("val L1", RED, |r| r.val_l1),
        ];
        for (name, color, pick) in series {
            let points: Vec<(u64, f64)> = rows
                .iter()
                .filter_map(|r| pick(r).map(|v| (r.step, v)))
                .collect();
            let drawn = chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| e.to_string())?;
            if with_text {
                drawn
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
        }
        if with_text {
            chart
                .configure_series_labels()
                .background_style(WHITE)
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
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

/// A grid with one row per image: input on the left, reconstruction on the right.
pub fn write_grid(
    path: &Path,
    inputs: &[RgbImage],
    reconstructions: &[RgbImage],
) -> Result<(), String> {
    let Some(first) = inputs.first() else {
        return Ok(());
    };
    let (w, h) = first.dimensions();
    let per_row = 4u32; // pairs per row
    let rows = (inputs.len() as u32).div_ceil(per_row);
    let gap = 2;
    let mut grid = RgbImage::from_pixel(
        per_row * (2 * w + 3 * gap),
        rows * (h + gap),
        image::Rgb([255, 255, 255]),
    );
    for (i, (a, b)) in inputs.iter().zip(reconstructions).enumerate() {
        let (col, row) = (i as u32 % per_row, i as u32 / per_row);
        let x = col * (2 * w + 3 * gap);
        let y = row * (h + gap);
        image::imageops::replace(&mut grid, a, x as i64, y as i64);
        image::imageops::replace(&mut grid, b, (x + w + gap) as i64, y as i64);
    }
    let tmp = path.with_file_name(format!(".grid.tmp-{}.png", std::process::id()));
    grid.save(&tmp).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}
