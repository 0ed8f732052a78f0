//! The pipeline report: every figure with its target, the ceiling it is read against (measured
//! in the same run), the ratio and met/missed; and the cost model that predicts jobs/s
//! elsewhere from the CPU per job measured here.

use serde::Serialize;

/// What a figure must reach.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "camelCase")]
pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
    /// Reported for how cost grows; no target.
    Report,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Figure {
    pub figure: String,
    pub unit: &'static str,
    pub goal: Goal,
    /// `None`: could not be measured (for latency: the percentile fell among unfinished jobs).
    pub measured: Option<f64>,
    pub ceiling: Option<Ceiling>,
    /// `measured / ceiling`.
    pub ratio: Option<f64>,
    /// `Some(true)` met, `Some(false)` missed, `None` no target.
    pub met: Option<bool>,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub name: String,
    pub value: f64,
}

impl Figure {
    pub fn new(
        figure: impl Into<String>,
        unit: &'static str,
        goal: Goal,
        measured: Option<f64>,
    ) -> Figure {
        let met = match (goal, measured) {
            (Goal::AtLeast(t), Some(m)) => Some(m >= t),
            (Goal::AtMost(t), Some(m)) => Some(m <= t),
            (Goal::AtLeast(_) | Goal::AtMost(_), None) => Some(false),
            (Goal::Report, _) => None,
        };
        Figure {
            figure: figure.into(),
            unit,
            goal,
            measured,
            ceiling: None,
            ratio: None,
            met,
            note: String::new(),
        }
    }

    /// Reads the figure against `ceiling` (ratio = measured / ceiling).
    pub fn against(mut self, name: impl Into<String>, value: f64) -> Figure {
        self.ratio = self.measured.map(|m| m / value);
        self.ceiling = Some(Ceiling {
            name: name.into(),
            value,
        });
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = note.into();
        self
    }
}

/// A number the way the table shows it: thousands separated, decimals for small values.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    if v.abs() >= 100.0 {
        let s = format!("{:.0}", v);
        let (sign, digits) = s.strip_prefix('-').map(|d| ("-", d)).unwrap_or(("", &s));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn goal_text(goal: Goal, unit: &str) -> String {
    match goal {
        Goal::AtLeast(t) => format!("≥ {} {unit}", num(t)).trim_end().to_string(),
        Goal::AtMost(t) => format!("≤ {} {unit}", num(t)).trim_end().to_string(),
        Goal::Report => "–".into(),
    }
}

/// The table as printed (and pasted into docs/performance.md): a Markdown table.
pub fn table(figures: &[Figure]) -> String {
    let mut out = String::from(
        "| figure | target | measured | ceiling (same run) | ratio | |\n|---|---|---|---|---|---|\n",
    );
    for f in figures {
        let measured = match f.measured {
            Some(m) => format!("{} {}", num(m), f.unit).trim_end().to_string(),
            None => "not reached".into(),
        };
        let ceiling = f
            .ceiling
            .as_ref()
            .map(|c| format!("{} {}", c.name, num(c.value)))
            .unwrap_or_else(|| "–".into());
        let ratio = f.ratio.map(num).unwrap_or_else(|| "–".into());
        let verdict = match f.met {
            Some(true) => "met",
            Some(false) => "missed",
            None => "",
        };
        let note = if f.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", f.note)
        };
        out.push_str(&format!(
            "| {}{note} | {} | {measured} | {ceiling} | {ratio} | {verdict} |\n",
            f.figure,
            goal_text(f.goal, f.unit)
        ));
    }
    out
}

/// CPU per job, measured in a backlog drain with the broker and Redis on the same machine.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CostModel {
    pub worker_us: f64,
    pub broker_us: f64,
    pub redis_us: f64,
    /// The cores of the machine the costs were measured on.
    pub cores: usize,
}

/// One prediction of the model.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Prediction {
    pub worker_cores: usize,
    pub replicas: usize,
    pub jobs_per_sec: f64,
    /// Cores the broker and Redis need elsewhere at that rate.
    pub broker_cores: f64,
    pub redis_cores: f64,
    /// What bounds it: `worker CPU` or `Redis (one thread)`.
    pub bound: &'static str,
}

impl CostModel {
    /// jobs/s when everything shares `cores` (as measured here): every job costs
    /// worker + broker + Redis CPU, whatever the number of replicas.
    pub fn colocated(&self, cores: usize) -> f64 {
        cores as f64 * 1e6 / (self.worker_us + self.broker_us + self.redis_us)
    }

    /// jobs/s with `cores` for the workers (`replicas` processes sharing them) and the
    /// broker and Redis elsewhere: the workers' CPU, bounded by Redis's single thread. The
    /// replicas drop out (each job costs the same worker CPU in whichever replica); the
    /// 2-replica run checks that.
    pub fn elsewhere(&self, cores: usize, replicas: usize) -> Prediction {
        let by_worker = cores as f64 * 1e6 / self.worker_us;
        let by_redis = if self.redis_us > 0.0 {
            1e6 / self.redis_us
        } else {
            f64::INFINITY
        };
        let (jobs_per_sec, bound) = if by_worker <= by_redis {
            (by_worker, "worker CPU")
        } else {
            (by_redis, "Redis (one thread)")
        };
        Prediction {
            worker_cores: cores,
            replicas,
            jobs_per_sec,
            broker_cores: jobs_per_sec * self.broker_us / 1e6,
            redis_cores: jobs_per_sec * self.redis_us / 1e6,
            bound,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_goal() {
        assert_eq!(
            Figure::new("a", "jobs/s", Goal::AtLeast(10.0), Some(10.0)).met,
            Some(true)
        );
        assert_eq!(
            Figure::new("a", "jobs/s", Goal::AtLeast(10.0), Some(9.0)).met,
            Some(false)
        );
        assert_eq!(
            Figure::new("a", "ms", Goal::AtMost(10.0), Some(11.0)).met,
            Some(false)
        );
        assert_eq!(
            Figure::new("a", "ms", Goal::AtMost(10.0), None).met,
            Some(false)
        );
        assert_eq!(Figure::new("a", "ms", Goal::Report, Some(1.0)).met, None);
        let f = Figure::new("a", "jobs/s", Goal::AtLeast(1.0), Some(50.0)).against("no-op", 200.0);
        assert_eq!(f.ratio, Some(0.25));
    }

    #[test]
    fn numbers_read_as_in_the_docs() {
        assert_eq!(num(20000.4), "20,000");
        assert_eq!(num(1234567.0), "1,234,567");
        assert_eq!(num(999.0), "999");
        assert_eq!(num(12.345), "12.35");
        assert_eq!(num(0.0612), "0.061");
        assert_eq!(num(f64::NAN), "–");
    }

    #[test]
    fn the_table_has_a_row_per_figure() {
        let t = table(&[
            Figure::new("jobs/s", "jobs/s", Goal::AtLeast(20000.0), Some(5000.0))
                .against("no-op", 40000.0),
            Figure::new("p99", "ms", Goal::AtMost(10.0), None).note("3 of 300 unfinished"),
        ]);
        let rows: Vec<&str> = t.lines().collect();
        assert_eq!(rows.len(), 4);
        assert_eq!(
            rows[2],
            "| jobs/s | ≥ 20,000 jobs/s | 5,000 jobs/s | no-op 40,000 | 0.125 | missed |"
        );
        assert!(rows[3].starts_with("| p99 (3 of 300 unfinished) | ≤ 10.00 ms | not reached |"));
    }

    #[test]
    fn the_model_is_bound_by_the_worker_or_by_redis() {
        let m = CostModel {
            worker_us: 100.0,
            broker_us: 60.0,
            redis_us: 40.0,
            cores: 2,
        };
        assert!((m.colocated(2) - 10_000.0).abs() < 1e-6);
        let p = m.elsewhere(2, 1);
        assert!((p.jobs_per_sec - 20_000.0).abs() < 1e-6);
        assert_eq!(p.bound, "worker CPU");
        assert!((p.broker_cores - 1.2).abs() < 1e-9);
        // 8 worker cores would do 80,000/s, but Redis's one thread does 25,000
        let p = m.elsewhere(8, 4);
        assert!((p.jobs_per_sec - 25_000.0).abs() < 1e-6);
        assert_eq!(p.bound, "Redis (one thread)");
    }
}
