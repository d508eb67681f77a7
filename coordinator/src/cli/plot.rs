//! `tessera job plot`: a job's metrics as SVG charts an ML lead puts in a
//! slide or a report, from the same rows `tessera job metrics` writes.
//!
//! Charts with one series per source (pooled by secure sum, the mean of
//! the sites' own figures, and each site that reports its own), so that the
//! pooled figure and the site mean are never mixed in one line:
//! - `loss.svg`: the weighted training loss of each round and the test loss
//!   of each model;
//! - `accuracy.svg`: test accuracy of each model;
//! - `roc_auc.svg`: ROC AUC of each model (pooled for the final model only:
//!   score histograms are summed once per job).
//! - `roc_curve.svg` and `calibration.svg` (deciles of predicted risk): the
//!   final model's, pooled from the summed score histograms, when the job
//!   has them (a secure job whose final evaluation ran, both classes
//!   present).
//!
//! SVG, drawn with plotters' SVG backend: no fonts or system libraries.

use std::collections::BTreeMap;

use anyhow::anyhow;
use plotters::prelude::*;
use tessera_protocol::pb;

use super::metrics::{self, MetricRow};

/// One chart, rendered.
pub(crate) struct Chart {
    pub file: &'static str,
    pub svg: String,
    /// The series drawn (a series without any defined point is left out).
    pub series: Vec<String>,
}

/// A named line of (round, value) points.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    /// A single point (the pooled AUC of the final model) is drawn as a
    /// marker, not a line.
    marker: bool,
}

/// The job's charts; an error when it has no metrics yet.
pub(crate) fn charts(status: &pb::JobStatusResponse) -> anyhow::Result<Vec<Chart>> {
    let rows = metrics::rows(status);
    if rows.is_empty() {
        return Err(anyhow!("the job has no metrics yet: nothing to plot"));
    }
    let train_loss = Series {
        name: "training loss (pooled, weighted)".into(),
        // The loss of the round that trained from this model: round m + 1.
        points: rows
            .iter()
            .filter(|r| r.source == "pooled")
            .filter_map(|r| Some((f64::from(r.model_of_round + 1), r.train_loss?)))
            .collect(),
        marker: false,
    };
    let mut loss = vec![train_loss];
    loss.extend(by_source(&rows, |r| r.loss, "test loss"));
    let rate = |label: &'static str| Axes {
        y_label: label,
        y_max: Some(1.0),
        ..Axes::ROUNDS
    };
    let mut charts = vec![
        render("loss.svg", "Loss", Axes::ROUNDS, loss)?,
        render(
            "accuracy.svg",
            "Test accuracy",
            rate("accuracy"),
            by_source(&rows, |r| r.accuracy, "accuracy"),
        )?,
        render(
            "roc_auc.svg",
            "ROC AUC",
            rate("ROC AUC"),
            by_source(&rows, |r| r.roc_auc, "ROC AUC"),
        )?,
    ];
    // The final model's curves, from the pooled histograms: against the
    // diagonal, on the unit square.
    let diagonal = |name: &str| Series {
        name: name.into(),
        points: vec![(0.0, 0.0), (1.0, 1.0)],
        marker: false,
    };
    let unit = |x_label, y_label| Axes {
        x_label,
        y_label,
        y_max: Some(1.0),
        rounds: false,
    };
    if !status.roc_curve.is_empty() {
        let curve = Series {
            name: "final model, pooled (secure sum)".into(),
            points: status.roc_curve.iter().map(|p| (p.x, p.y)).collect(),
            marker: false,
        };
        let axes = unit(
            "false positive rate (1 - specificity)",
            "true positive rate (sensitivity)",
        );
        charts.push(render(
            "roc_curve.svg",
            "ROC curve",
            axes,
            vec![curve, diagonal("chance")],
        )?);
    }
    if !status.calibration.is_empty() {
        let curve = Series {
            name: "final model, pooled: deciles of predicted risk".into(),
            points: status.calibration.iter().map(|b| (b.predicted, b.observed)).collect(),
            marker: false,
        };
        let axes = unit("predicted probability", "observed rate of positives");
        charts.push(render(
            "calibration.svg",
            "Calibration",
            axes,
            vec![curve, diagonal("perfect calibration")],
        )?);
    }
    Ok(charts)
}

/// A chart's axes: x in rounds (whole numbers) or in [0, 1].
#[derive(Clone, Copy)]
struct Axes {
    x_label: &'static str,
    y_label: &'static str,
    /// The top of the y axis (1 for a rate); from the data when `None`.
    y_max: Option<f64>,
    rounds: bool,
}

impl Axes {
    const ROUNDS: Axes = Axes {
        x_label: "round (metrics: of the model after it; 0 is the initial model)",
        y_label: "loss",
        y_max: None,
        rounds: true,
    };
}

/// The pooled series, the mean over the sites that report, then each site,
/// of the metric `value` per model.
fn by_source(rows: &[MetricRow], value: impl Fn(&MetricRow) -> Option<f64>, what: &str) -> Vec<Series> {
    let mut sites: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    let mut per_model: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    let mut pooled = Vec::new();
    for row in rows {
        let Some(v) = value(row).filter(|v| v.is_finite()) else {
            continue;
        };
        let x = f64::from(row.model_of_round);
        if row.source == "pooled" {
            pooled.push((x, v));
        } else {
            sites.entry(&row.source).or_default().push((x, v));
            per_model.entry(row.model_of_round).or_default().push(v);
        }
    }
    let mean = per_model
        .into_iter()
        .map(|(m, vs)| (f64::from(m), vs.iter().sum::<f64>() / vs.len() as f64))
        .collect();
    let mut series = vec![
        Series {
            name: format!("{what}, pooled (secure sum)"),
            marker: pooled.len() == 1,
            points: pooled,
        },
        Series {
            name: format!("{what}, mean over sites"),
            points: mean,
            marker: false,
        },
    ];
    series.extend(sites.into_iter().map(|(site, points)| Series {
        name: format!("{what}, {site}"),
        points,
        marker: false,
    }));
    series
}

/// Draws the non-empty series on one chart.
fn render(file: &'static str, title: &str, axes: Axes, series: Vec<Series>) -> anyhow::Result<Chart> {
    let series: Vec<Series> = series.into_iter().filter(|s| !s.points.is_empty()).collect();
    let points = || series.iter().flat_map(|s| s.points.iter());
    let x_max = points().map(|p| p.0).fold(1.0, f64::max);
    let y_max = axes
        .y_max
        .unwrap_or_else(|| points().map(|p| p.1).fold(f64::MIN_POSITIVE, f64::max) * 1.1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 520)).into_drawing_area();
        let draw = |e: &dyn std::fmt::Display| anyhow!("cannot draw {file}: {e}");
        root.fill(&WHITE).map_err(|e| draw(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(|e| draw(&e))?;
        // Rounds are whole numbers: at most one label per round.
        let round_label = |x: &f64| format!("{x:.0}");
        let rate_label = |x: &f64| format!("{x:.1}");
        let (x_labels, x_format): (usize, &dyn Fn(&f64) -> String) = if axes.rounds {
            ((x_max as usize + 1).min(12), &round_label)
        } else {
            (11, &rate_label)
        };
        chart
            .configure_mesh()
            .x_labels(x_labels)
            .x_label_formatter(x_format)
            .light_line_style(RGBColor(238, 238, 238))
            .x_desc(axes.x_label)
            .y_desc(axes.y_label)
            .draw()
            .map_err(|e| draw(&e))?;
        for (i, s) in series.iter().enumerate() {
            // Pooled first, in black and thicker; the site mean in grey; sites
            // in palette colours.
            let color = match i {
                0 => BLACK.to_rgba(),
                1 => RGBColor(110, 110, 110).to_rgba(),
                _ => Palette99::pick(i - 2).to_rgba(),
            };
            let style = color.stroke_width(if i == 0 { 3 } else { 2 });
            let drawn = if s.marker {
                chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 6, style.filled())))
                    .map_err(|e| draw(&e))?
            } else {
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), style))
                    .map_err(|e| draw(&e))?
            };
            drawn
                .label(&s.name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 4), (x + 16, y + 4)], style.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw(&e))?;
        root.present().map_err(|e| draw(&e))?;
    }
    Ok(Chart {
        file,
        svg,
        series: series.into_iter().map(|s| s.name).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> pb::JobStatusResponse {
        let site = |round, site_id: &str, accuracy, auc| pb::SiteMetrics {
            round,
            site_id: site_id.into(),
            n_test: 10,
            loss: 0.5,
            accuracy,
            auc,
            ..Default::default()
        };
        let pooled = |round, accuracy, binary| pb::PooledMetrics {
            round,
            n_sites: 3,
            n_test: 30,
            accuracy,
            loss: 0.4,
            binary,
        };
        let final_binary = pb::BinaryMetrics {
            roc_auc: Some(0.8),
            threshold: 0.5,
            ..Default::default()
        };
        pb::JobStatusResponse {
            metrics: vec![
                site(1, "a", 0.5, 0.6),
                site(1, "b", 0.6, f64::NAN),
                site(2, "a", 0.7, 0.7),
                site(2, "b", 0.8, f64::NAN),
            ],
            pooled: vec![pooled(1, 0.55, None), pooled(2, 0.75, Some(final_binary))],
            roc_curve: [(0.0, 0.0), (0.2, 0.7), (1.0, 1.0)]
                .map(|(x, y)| pb::CurvePoint { x, y })
                .to_vec(),
            rounds: vec![pb::RoundSummary {
                round: 1,
                mean_train_loss: 0.45,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// The polylines of a series (the grid's are 1 wide, a site's 2, the
    /// pooled series' 3).
    pub(crate) fn series_lines(svg: &str) -> usize {
        svg.split("<polyline")
            .skip(1)
            .map(|p| p.split('>').next().unwrap_or_default())
            .filter(|p| p.contains("stroke-width=\"2\"") || p.contains("stroke-width=\"3\""))
            .count()
    }

    /// Each chart is an SVG with one line per source that has a value, and
    /// the pooled AUC (final model only) is a marker; a site whose AUC is
    /// undefined has no AUC series rather than a line through NaN.
    #[test]
    fn charts_have_a_series_per_source_with_values() {
        let charts = charts(&status()).unwrap();
        let names: Vec<&str> = charts.iter().map(|c| c.file).collect();
        assert_eq!(names, ["loss.svg", "accuracy.svg", "roc_auc.svg", "roc_curve.svg"]);
        assert_eq!(charts[3].series, ["final model, pooled (secure sum)", "chance"]);
        assert_eq!(series_lines(&charts[3].svg), 2);
        for chart in &charts {
            assert!(chart.svg.starts_with("<svg") && chart.svg.trim_end().ends_with("</svg>"));
            assert!(!chart.svg.contains("NaN"), "{}", chart.file);
            for name in &chart.series {
                assert!(
                    chart.svg.contains(name.as_str()),
                    "{} lacks the legend {name}",
                    chart.file
                );
            }
        }
        assert_eq!(
            charts[1].series,
            [
                "accuracy, pooled (secure sum)",
                "accuracy, mean over sites",
                "accuracy, a",
                "accuracy, b"
            ]
        );
        assert_eq!(
            charts[2].series,
            ["ROC AUC, pooled (secure sum)", "ROC AUC, mean over sites", "ROC AUC, a"]
        );
        // The final pooled AUC is a marker (a circle); the lines are
        // polylines of width 2 (the grid's are 1): mean and site a.
        assert_eq!(charts[2].svg.matches("<circle").count(), 1);
        assert_eq!(series_lines(&charts[2].svg), 2);
        assert_eq!(series_lines(&charts[1].svg), 4);
        assert_eq!(charts[0].series[0], "training loss (pooled, weighted)");
        assert!(super::charts(&pb::JobStatusResponse::default()).is_err());
    }
}
