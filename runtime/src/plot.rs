//! PNG line plots of loss curves (log-scale y), drawn with plotters.
//!
//! Text needs a font, and plotters is built with `ab_glyph`, which renders
//! only fonts registered at run time (no fontconfig, no system lookup). The
//! font is read once from the file named by `METAC_PLOT_FONT` (`none` or
//! empty: draw no text), else from the
//! first of a few usual TrueType locations (DejaVu Sans, Liberation Sans,
//! Noto Sans, FreeSans, macOS Arial). Without any of them the plot is drawn
//! without text (no title, tick labels or legend): the lines and grid only,
//! in the fixed colour order of [`COLORS`]; the optimizer names are in the
//! CSV/JSON next to it.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, ensure, Result};
use plotters::prelude::*;

/// Line colours, in series order.
pub const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
];

const FAMILY: &str = "sans-serif";

/// Registers a font with plotters once per process; whether one is available.
pub fn font_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let mut paths: Vec<String> = vec![];
        match std::env::var("METAC_PLOT_FONT") {
            Ok(p) if p.is_empty() || p == "none" => return false,
            Ok(p) => paths.push(p),
            Err(_) => {}
        }
        paths.extend(FONT_CANDIDATES.iter().map(|s| s.to_string()));
        for p in paths {
            let Ok(bytes) = std::fs::read(&p) else {
                continue;
            };
            // Registered fonts must live for the whole process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        false
    })
}

/// How to draw a plot.
#[derive(Clone, Debug)]
pub struct PlotOptions {
    pub width: u32,
    pub height: u32,
    /// Trailing moving-average window applied to every series (1 = none).
    pub smoothing: usize,
    /// Logarithmic y axis (non-positive values are left out).
    pub log_y: bool,
    pub x_label: String,
    pub y_label: String,
    /// Top of the y axis: a series is drawn up to its first point above it
    /// (None: everything is drawn).
    pub y_max: Option<f64>,
}

impl Default for PlotOptions {
    fn default() -> Self {
        PlotOptions {
            width: 1000,
            height: 650,
            smoothing: 1,
            log_y: true,
            x_label: "step".into(),
            y_label: "minibatch loss".into(),
            y_max: None,
        }
    }
}

/// Trailing moving average over `window` points (the first points average
/// over what is there).
pub fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    if window <= 1 {
        return points.to_vec();
    }
    let mut out = Vec::with_capacity(points.len());
    let mut sum = 0.0;
    for i in 0..points.len() {
        sum += points[i].1;
        if i >= window {
            sum -= points[i - window].1;
        }
        let n = (i + 1).min(window) as f64;
        out.push((points[i].0, sum / n));
    }
    out
}

/// A named line: `(name, (x, y) points)`.
pub type Line = (String, Vec<(f64, f64)>);

/// A log-scale line plot of `series` (name, `(x, y)` points) with the default
/// options: one line per series, title and legend with the series names.
pub fn plot_curves(path: &Path, title: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    plot_curves_with(path, title, series, &PlotOptions::default())
}

/// [`plot_curves`] with explicit options.
pub fn plot_curves_with(
    path: &Path,
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    opts: &PlotOptions,
) -> Result<()> {
    plot_panels(path, &[(title, series)], opts)
}

/// Several line plots side by side in one image (`opts.width` each), one per
/// `(title, series)` panel. A series name keeps its colour in every panel.
/// The y axis of every panel ends at `opts.y_max`, if given.
pub fn plot_panels(path: &Path, panels: &[(&str, &[Line])], opts: &PlotOptions) -> Result<()> {
    ensure!(!panels.is_empty(), "plot {}: no panels", path.display());
    // A series' colour follows its name up to a parenthesised note ("short
    // run (diverged at ...)" keeps the colour of "short run").
    let key = |n: &str| n.split(" (").next().unwrap_or(n).to_string();
    let mut names: Vec<String> = vec![];
    for (_, series) in panels {
        for (n, _) in series.iter() {
            if !names.contains(&key(n)) {
                names.push(key(n));
            }
        }
    }
    let width = opts.width * panels.len() as u32;
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    // Drawn into an RGB buffer and encoded here: plotters' own encoder pulls
    // in the whole `image` crate (JPEG, BMP, ...) for one PNG.
    let mut rgb = vec![0u8; width as usize * opts.height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, opts.height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let areas = root.split_evenly((1, panels.len()));
        for ((title, series), area) in panels.iter().zip(&areas) {
            let colours: Vec<RGBColor> = series
                .iter()
                .map(|(n, _)| {
                    let i = names.iter().position(|m| *m == key(n)).unwrap_or(0);
                    COLORS[i % COLORS.len()]
                })
                .collect();
            draw_chart(area, path, title, series, &colours, opts)?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    write_png(path, width, opts.height, &rgb)
}

/// One line chart of `series` (with `colours`) on `root`.
fn draw_chart(
    root: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    path: &Path,
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    colours: &[RGBColor],
    opts: &PlotOptions,
) -> Result<()> {
    // A log y axis is drawn as a linear axis over log10(y) with tick labels
    // mapped back (plotters' own log axis labels only powers of ten, so a
    // curve spanning less than a decade would get no y labels at all).
    let series: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, p)| {
            let p = smooth(p, opts.smoothing)
                .into_iter()
                .take_while(|&(_, y)| opts.y_max.is_none_or(|m| y <= m))
                .filter(|(x, y)| x.is_finite() && y.is_finite() && (!opts.log_y || *y > 0.0))
                .map(|(x, y)| (x, if opts.log_y { y.log10() } else { y }))
                .collect();
            (n.clone(), p)
        })
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in series.iter().flat_map(|(_, p)| p.iter()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        bail!("plot '{title}': no points to draw");
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = if y1 > y0 { (y1 - y0) * 0.05 } else { 0.5 };
    y0 -= pad;
    y1 += pad;
    let text = font_available();
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    {
        let mut b = ChartBuilder::on(root);
        b.margin(15);
        if text {
            b.caption(title, (FAMILY, 26))
                .x_label_area_size(45)
                .y_label_area_size(80);
        } else {
            b.x_label_area_size(10).y_label_area_size(10);
        }
        let mut chart = b.build_cartesian_2d(x0..x1, y0..y1).map_err(|e| err(&e))?;
        let log_y = opts.log_y;
        let x_fmt = |x: &f64| {
            if (x1 - x0) >= 10.0 {
                format!("{x:.0}")
            } else {
                // At most 4 decimals, trailing zeros cut (no 0.6000000000000001).
                let s = format!("{x:.4}");
                let s = s.trim_end_matches('0').trim_end_matches('.');
                if s == "-0" {
                    "0".into()
                } else {
                    s.to_string()
                }
            }
        };
        let y_fmt = |y: &f64| {
            let v = if log_y { 10f64.powf(*y) } else { *y };
            // Scientific notation outside [0.01, 1e4] keeps labels inside the margin.
            if v != 0.0 && (v.abs() < 0.01 || v.abs() >= 1e4) {
                format!("{v:.2e}")
            } else {
                format!("{v:.3}")
            }
        };
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(TRANSPARENT)
            .bold_line_style(RGBColor(225, 225, 225));
        if text {
            mesh.x_labels(10)
                .y_labels(10)
                .x_label_formatter(&x_fmt)
                .y_label_formatter(&y_fmt)
                .x_desc(opts.x_label.as_str())
                .y_desc(if log_y {
                    format!("{} (log scale)", opts.y_label)
                } else {
                    opts.y_label.clone()
                })
                .label_style((FAMILY, 15))
                .axis_desc_style((FAMILY, 17));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|e| err(&e))?;
        for (i, (name, p)) in series.iter().enumerate() {
            let c = colours[i];
            let s = chart
                .draw_series(LineSeries::new(p.iter().copied(), c.stroke_width(2)))
                .map_err(|e| err(&e))?;
            if text {
                s.label(name.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
                });
            }
        }
        if text && !series.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font((FAMILY, 16))
                .draw()
                .map_err(|e| err(&e))?;
        }
    }
    Ok(())
}

/// Encodes an 8-bit RGB image as PNG and writes it atomically.
fn write_png(path: &Path, width: u32, height: u32, rgb: &[u8]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| err(&e))?;
        w.write_image_data(rgb).map_err(|e| err(&e))?;
        w.finish().map_err(|e| err(&e))?;
    }
    metac_contract::fsutil::write_atomic(path, &bytes)
}

/// A spectral density plot: one line per series of `(eigenvalue, density)`
/// points on a log-scale y axis, every value clipped from below at
/// `floor_relative` times the largest density of all series (so the empty
/// stretches between eigenvalue clusters show as a floor rather than as
/// gaps).
pub fn plot_density(
    path: &Path,
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    floor_relative: f64,
) -> Result<()> {
    let peak = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .filter(|y| y.is_finite())
        .fold(0.0, f64::max);
    if peak <= 0.0 {
        bail!("plot '{title}': the density is zero everywhere");
    }
    let floor = peak * floor_relative;
    let clipped: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, p)| {
            (
                n.clone(),
                p.iter().map(|&(x, y)| (x, y.max(floor))).collect(),
            )
        })
        .collect();
    let opts = PlotOptions {
        log_y: true,
        x_label: "eigenvalue".into(),
        y_label: "density".into(),
        ..PlotOptions::default()
    };
    plot_curves_with(path, title, &clipped, &opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_a_trailing_mean() {
        let p = vec![(1.0, 1.0), (2.0, 3.0), (3.0, 5.0)];
        assert_eq!(smooth(&p, 2), vec![(1.0, 1.0), (2.0, 2.0), (3.0, 4.0)]);
        assert_eq!(smooth(&p, 1), p);
    }

    #[test]
    fn density_plot_is_written_and_rejects_zero() {
        let dir = std::env::temp_dir().join(format!("metac-plot-density-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("d.png");
        let pts: Vec<(f64, f64)> = (0..100)
            .map(|i| {
                let x = i as f64 / 10.0;
                (x, (-(x - 3.0) * (x - 3.0)).exp())
            })
            .collect();
        plot_density(&png, "density", &[("h".into(), pts)], 1e-6).unwrap();
        // A real image with something drawn on it: many colours, not one.
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert!(
            info.width >= 200 && info.height >= 150,
            "{} x {}",
            info.width,
            info.height
        );
        let colours: std::collections::HashSet<&[u8]> = buf[..info.buffer_size()]
            .chunks(info.line_size / info.width as usize)
            .collect();
        assert!(colours.len() > 3, "{} colours", colours.len());
        let zero = vec![(0.0, 0.0), (1.0, 0.0)];
        assert!(plot_density(&png, "z", &[("h".into(), zero)], 1e-6).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
