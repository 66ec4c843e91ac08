//! The Prometheus text exposition format (version 0.0.4), shared by the `/metrics` endpoints
//! of the coordinator, the workers and the dataloaders.

use std::fmt::Write;

/// Content type of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Builds an exposition: each family once (HELP, TYPE), then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Exposition {
    /// Starts a family of kind `gauge` or `counter`.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    /// One sample with labels (values escaped).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        let labels = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", labels.join(","))
        };
        let _ = writeln!(self.text, "{name}{labels} {value}");
        self
    }

    /// The `taming_spans_dropped_total` counter every service exposes: spans its telemetry
    /// dropped because the OTLP export queue was full (`dropped`, since start).
    pub fn spans_dropped(&mut self, dropped: u64) -> &mut Self {
        const NAME: &str = "taming_spans_dropped_total";
        self.family(
            NAME,
            "counter",
            "Spans dropped because the OTLP export queue was full.",
        )
        .sample(NAME, &[], dropped as f64)
    }

    /// The text.
    pub fn finish(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_escaped_labels() {
        let mut e = Exposition::default();
        e.family("x_total", "counter", "Things.")
            .sample("x_total", &[("job", "a\"b")], 3.0)
            .sample("x_total", &[], 1.5);
        assert_eq!(
            e.finish(),
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{job=\"a\\\"b\"} 3\nx_total 1.5\n"
        );
    }
}
