//! Sweeps over guidance and sampling steps: sweep.csv and one score and one FID plot per swept variable.

use std::path::Path;

use anyhow::Result;

use super::{Outcome, Space};

/// sweep.csv (one row per setting) and, per swept variable, a score plot and an FID plot with the floors.
pub(super) fn write_sweeps(run: &Path, spaces: &[Space<'_>], rows: &[(&str, f32, usize, Outcome)]) -> Result<()> {
    use crate::plot::{line_plot, Series};
    use plotters::style::RGBColor;
    let mut csv = String::from("sweep,guidance,steps,classifier_score");
    for sp in spaces {
        csv += &format!(",fid_{0},fid_{0}_floor", sp.ext.name());
    }
    csv += "\n";
    for (sweep, w, st, out) in rows {
        csv += &format!("{sweep},{w},{st},{}", out.score.map(|s| s.to_string()).unwrap_or_default());
        for (sp, (_, f)) in spaces.iter().zip(&out.fid) {
            csv += &format!(",{f},{}", sp.floor);
        }
        csv += "\n";
    }
    crate::train::checkpoint::write_atomic(&run.join("sweep.csv"), csv.as_bytes())?;
    const COLORS: [RGBColor; 4] =
        [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(148, 103, 189)];
    for (sweep, label) in [("guidance", "guidance weight w"), ("steps", "sampling steps")] {
        let sel: Vec<_> = rows.iter().filter(|r| r.0 == sweep).collect();
        if sel.is_empty() {
            continue;
        }
        let x = |r: &(&str, f32, usize, Outcome)| if sweep == "guidance" { r.1 as f64 } else { r.2 as f64 };
        if sel.iter().all(|r| r.3.score.is_some()) {
            let pts = sel.iter().map(|r| (x(r), r.3.score.unwrap())).collect();
            line_plot(
                &run.join(format!("sweep-{sweep}-score.png")),
                &format!("classifier score vs {label}"),
                label,
                "classifier score",
                &[Series { name: "score", points: pts, color: COLORS[0] }],
                false,
            )?;
        }
        let mut series = vec![];
        let names: Vec<String> = spaces.iter().map(|s| format!("{} floor", s.ext.name())).collect();
        for (i, sp) in spaces.iter().enumerate() {
            let pts = sel.iter().map(|r| (x(r), r.3.fid[i].1)).collect();
            series.push(Series { name: sp.ext.name(), points: pts, color: COLORS[(2 * i) % 4] });
            let floor = sel.iter().map(|r| (x(r), sp.floor)).collect();
            series.push(Series { name: &names[i], points: floor, color: COLORS[(2 * i + 1) % 4] });
        }
        line_plot(
            &run.join(format!("sweep-{sweep}-fid.png")),
            &format!("FID vs {label}"),
            label,
            "FID",
            &series,
            true,
        )?;
    }
    Ok(())
}
