//! Turning measurements into the table, the summary line, `report.md` and the latency
//! histogram PNG (plotters).

use super::latency::LatencyStats;
use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::path::Path;

/// The latency target for a direction, and whether it was met (`None`: no target).
pub fn latency_goal(source: &str, target: &str, s: &LatencyStats) -> (Value, Value) {
    let (p50, p99) = match (source, target) {
        ("Redis", "PostgreSQL") => (Some(2.0), 10.0),
        ("PostgreSQL", "Redis") => (Some(3.0), 15.0),
        ("SQLite", "Redis") => (None, 25.0),
        ("MySQL", "PostgreSQL") | ("MySQL", "Redis") => (None, 25.0),
        _ => return (Value::Null, Value::Null),
    };
    let all_seen = s.seen == s.writes;
    let ok = all_seen && s.p99_ms <= p99 && p50.is_none_or(|p| s.p50_ms <= p);
    let goal = match p50 {
        Some(p) => format!("p50 ≤ {p} ms, p99 ≤ {p99} ms"),
        None => format!("p99 ≤ {p99} ms"),
    };
    (json!(goal), json!(ok))
}

fn label(measure: &str) -> &'static str {
    match measure {
        "latency" => "latency at 1k writes/s",
        "latency_baseline" => "older approach: full sync every 5 s",
        "throughput" => "burst throughput",
        "catchup" => "catch-up after downtime",
        "peak_rss" => "peak RSS",
        "sweep" => "sweep pass, changed records",
        "sweep_idle" => "sweep pass, nothing changed",
        "replication_latency" => "browser protocol at 1k writes/s: cloud write → SSE → pull",
        "pull_throughput" => "browser protocol: pull from scratch, limit=1000",
        "pull_idle" => "browser protocol: idle pull",
        _ => "",
    }
}

/// A Markdown table of the measurements.
pub fn table(lines: &[Value]) -> String {
    let mut out =
        String::from("| direction | measure | result | target | met |\n|---|---|---|---|---|\n");
    for l in lines {
        let m = l["measure"].as_str().unwrap_or_default();
        if m == "summary" {
            continue;
        }
        let met = match l["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {met} |\n",
            l["direction"].as_str().unwrap_or_default(),
            label(m),
            l["result"].as_str().unwrap_or_default(),
            l["goal"].as_str().unwrap_or_default(),
        ));
    }
    out
}

/// The summary object for the Redis → PostgreSQL direction (or the first direction measured
/// when that pair was not run), with the browser-protocol figures when that phase ran.
pub fn summary(lines: &[Value]) -> Option<Value> {
    let is = |l: &Value, m: &str| l["measure"] == m;
    let wanted = lines
        .iter()
        .find(|l| is(l, "latency") && l["source"] == "Redis" && l["target"] == "PostgreSQL")
        .or_else(|| lines.iter().find(|l| is(l, "latency")));
    let replication = lines.iter().find(|l| is(l, "replication_latency"));
    if wanted.is_none() && replication.is_none() {
        return None;
    }
    let mut out = json!({"measure": "summary"});
    if let Some(wanted) = wanted {
        let (pair, direction) = (&wanted["pair"], &wanted["direction"]);
        let find = |m: &str| {
            lines
                .iter()
                .find(|l| is(l, m) && &l["pair"] == pair && &l["direction"] == direction)
        };
        let idle = lines
            .iter()
            .find(|l| is(l, "sweep_idle") && &l["pair"] == pair);
        out = json!({
            "measure": "summary",
            "direction": direction,
            "p50_ms": wanted["stats"]["p50_ms"],
            "p99_ms": wanted["stats"]["p99_ms"],
            "throughput_per_s": find("throughput").map(|l| l["per_s"].clone()),
            "catchup_s": find("catchup").map(|l| l["secs"].clone()),
            "sweep_ms": find("sweep").map(|l| l["ms"].clone()),
            "sweep_idle_ms": idle.map(|l| l["ms"].clone()),
            "peak_rss_mb": find("peak_rss").map(|l| l["mb"].clone()),
        });
    }
    if let Some(r) = replication {
        let pair = &r["pair"];
        let find = |m: &str| lines.iter().find(|l| is(l, m) && &l["pair"] == pair);
        out["replication"] = json!({
            "direction": r["direction"],
            "p50_ms": r["stats"]["p50_ms"],
            "p99_ms": r["stats"]["p99_ms"],
            "pull_per_s": find("pull_throughput").map(|l| l["per_s"].clone()),
            "pull_records": find("pull_throughput").map(|l| l["records"].clone()),
            "idle_pull_ms": find("pull_idle").map(|l| l["p50_ms"].clone()),
        });
    }
    Some(out)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {mem_gib:.0} GiB RAM, Linux {}, stores on loopback, release build",
        kernel.trim()
    )
}

/// Reads JSON lines from `from`, prints the table and the summary, and writes `report.md` and
/// `latency.png` into `out`.
pub fn write(from: &Path, out: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(from).with_context(|| format!("cannot read {}", from.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} holds a line that is not JSON", from.display()))?;
    std::fs::create_dir_all(out)?;
    let table = table(&lines);
    let summary = summary(&lines).context("no latency measurement to summarize")?;
    let title = summary["direction"]
        .as_str()
        .or(summary["replication"]["direction"].as_str())
        .unwrap_or_default()
        .to_string();
    let png = out.join("latency.png");
    histogram(&lines, &png)?;
    let md = format!(
        "# syncbridge benchmark\n\nMachine: {}.\n\n{table}\nSummary ({title}): `{summary}`\n\n\
         Latency histogram: `latency.png`. Raw measurements: `{}`.\n",
        machine(),
        from.file_name().unwrap_or_default().to_string_lossy()
    );
    std::fs::write(out.join("report.md"), md)?;
    println!("{table}");
    println!("{summary}");
    Ok(())
}

/// One line per direction: the share of records per latency bucket, on a log axis.
fn histogram(lines: &[Value], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let series: Vec<(String, Vec<(f64, f64)>)> = lines
        .iter()
        .filter(|l| {
            ["latency", "latency_baseline", "replication_latency"]
                .iter()
                .any(|m| l["measure"] == *m)
        })
        .filter_map(|l| {
            let hist: Vec<(f64, u64)> = serde_json::from_value(l["stats"]["hist"].clone()).ok()?;
            let total: u64 = hist.iter().map(|h| h.1).sum();
            if total == 0 {
                return None;
            }
            let name = format!(
                "{}{}",
                l["direction"].as_str().unwrap_or_default(),
                if l["measure"] == "latency_baseline" {
                    " (full sync / 5 s)"
                } else {
                    ""
                }
            );
            Some((
                name,
                hist.iter()
                    .map(|(b, c)| (*b, 100.0 * *c as f64 / total as f64))
                    .collect(),
            ))
        })
        .collect();
    let root = BitMapBackend::new(path, (1200, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "syncbridge propagation latency at 1,000 writes/s",
            ("sans-serif", 26),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((0.2f64..60_000f64).log_scale(), 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (bucket upper bound, log scale)")
        .y_desc("% of records")
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
