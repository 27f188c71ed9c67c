//! Prometheus metrics: counters the handlers bump, gauges read from the scheduler at scrape time,
//! and an RPC latency histogram. Served as text on `--metrics-listen` (`GET /metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RpcLabel {
    pub method: String,
}

/// Latency buckets in seconds: 50 us to 1 s, since the p99 target is 50 ms.
const RPC_LATENCY_BUCKETS_S: [f64; 12] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
];

pub struct Metrics {
    pub results: Counter,
    pub failed: Counter,
    pub duplicates: Counter,
    pub retries: Counter,
    pub leases_granted: Counter,
    pub cases_pending: Gauge,
    pub cases_running: Gauge,
    pub cases_done: Gauge,
    pub cases_failed: Gauge,
    pub agents_alive: Gauge,
    pub leases_expired: Gauge,
    pub rpc_latency: Family<RpcLabel, Histogram>,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("decodebench");
        let results = Counter::default();
        let failed = Counter::default();
        let duplicates = Counter::default();
        let retries = Counter::default();
        let leases_granted = Counter::default();
        let cases_pending = Gauge::default();
        let cases_running = Gauge::default();
        let cases_done = Gauge::default();
        let cases_failed = Gauge::default();
        let agents_alive = Gauge::default();
        let leases_expired = Gauge::default();
        let rpc_latency = Family::<RpcLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(RPC_LATENCY_BUCKETS_S)
        });
        registry.register("results", "Results made durable", results.clone());
        registry.register(
            "failed",
            "Cases recorded as failed after all attempts",
            failed.clone(),
        );
        registry.register(
            "duplicate_results",
            "Reports of units that already had a result",
            duplicates.clone(),
        );
        registry.register(
            "retries",
            "Failed attempts queued for another try",
            retries.clone(),
        );
        registry.register(
            "leases_granted",
            "Shards leased to agents",
            leases_granted.clone(),
        );
        registry.register(
            "cases_pending",
            "Units waiting for an agent",
            cases_pending.clone(),
        );
        registry.register(
            "cases_running",
            "Units under a lease",
            cases_running.clone(),
        );
        registry.register("cases_done", "Units with a result", cases_done.clone());
        registry.register(
            "cases_failed_total_now",
            "Units recorded as failed",
            cases_failed.clone(),
        );
        registry.register(
            "agents_alive",
            "Agents seen within the lease timeout",
            agents_alive.clone(),
        );
        registry.register(
            "leases_expired",
            "Leases that expired without a heartbeat",
            leases_expired.clone(),
        );
        registry.register(
            "rpc_latency_seconds",
            "Server-side RPC handling time",
            rpc_latency.clone(),
        );
        Metrics {
            results,
            failed,
            duplicates,
            retries,
            leases_granted,
            cases_pending,
            cases_running,
            cases_done,
            cases_failed,
            agents_alive,
            leases_expired,
            rpc_latency,
            registry: Arc::new(registry),
        }
    }

    pub fn observe_rpc(&self, method: &str, elapsed: Duration) {
        self.rpc_latency
            .get_or_create(&RpcLabel {
                method: method.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Copies scheduler progress into the gauges.
    pub fn set_progress(&self, p: &crate::scheduler::Progress) {
        self.cases_pending.set(p.pending as i64);
        self.cases_running.set(p.running as i64);
        self.cases_done.set(p.done as i64);
        self.cases_failed.set(p.failed as i64);
        self.agents_alive.set(p.agents_alive as i64);
        self.leases_expired.set(p.leases_expired as i64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::new();
        m.results.inc();
        m.set_progress(&crate::scheduler::Progress {
            pending: 3,
            ..Default::default()
        });
        m.observe_rpc("report", Duration::from_millis(2));
        let text = m.render();
        assert!(text.contains("decodebench_results_total 1"), "{text}");
        assert!(text.contains("decodebench_cases_pending 3"), "{text}");
        assert!(
            text.contains("decodebench_rpc_latency_seconds_bucket"),
            "{text}"
        );
    }
}
