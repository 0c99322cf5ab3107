//! The metrics of what an instance sends out of the process besides frames: the session
//! ledger's writes to PostgreSQL and the outbound webhooks. Defined here, with every other
//! family of `/metrics`, so that [`crate::metrics`] depends on neither sender.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The ledger's metrics (registered with the instance's others, see [`crate::metrics`]).
#[derive(Debug, Clone, Default)]
pub struct LedgerMetrics {
    pub written: Counter,
    pub retries: Counter,
    pub dropped: Counter,
    pub queue_depth: Gauge,
}

impl LedgerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = LedgerMetrics::default();
        registry.register(
            "ledger_written",
            "Ledger records written to PostgreSQL",
            metrics.written.clone(),
        );
        registry.register(
            "ledger_retries",
            "Ledger batches that failed and are tried again (the database down, slow or refusing)",
            metrics.retries.clone(),
        );
        registry.register(
            "ledger_dropped",
            "Ledger records never written: the queue was full, the database refused them for \
             good, or the gateway stopped first",
            metrics.dropped.clone(),
        );
        registry.register(
            "ledger_queue_depth",
            "Ledger records waiting to be written (at most --database-queue, plus one batch)",
            metrics.queue_depth.clone(),
        );
        metrics
    }
}

/// The webhook figures of `/metrics`.
#[derive(Clone, Default)]
pub struct WebhookMetrics {
    /// By result: delivered, failed (refused or out of retries), dropped (queue full),
    /// trimmed (Redis mode: the outbox's bound removed it before delivery).
    pub events: Family<[(&'static str, &'static str); 1], Counter>,
    pub retries: Counter,
    /// Redis mode: outbox entries taken over from an instance that left them idle.
    pub claimed: Counter,
    /// Events accepted and not finished yet (waiting or on their way).
    pub queued: Gauge,
}

impl WebhookMetrics {
    /// Metrics registered in `registry`, every label value present from the start.
    pub fn register(registry: &mut Registry) -> WebhookMetrics {
        let metrics = WebhookMetrics::default();
        registry.register(
            "webhook_events",
            "Outbound webhook events by result: delivered, failed (refused by the receiver or out \
             of retries), dropped (the queue was full), trimmed (Redis mode: the outbox was full)",
            metrics.events.clone(),
        );
        registry.register(
            "webhook_retries",
            "Outbound webhook deliveries tried again after a failed attempt",
            metrics.retries.clone(),
        );
        registry.register(
            "webhook_claimed",
            "Outbound webhook events taken over from an instance that left them idle (Redis mode)",
            metrics.claimed.clone(),
        );
        registry.register(
            "webhook_queue_depth",
            "Outbound webhook events waiting for delivery or on their way",
            metrics.queued.clone(),
        );
        for result in ["delivered", "failed", "dropped", "trimmed"] {
            let _ = metrics.events.get_or_create(&[("result", result)]);
        }
        metrics
    }

    pub fn count(&self, result: &'static str) {
        self.events.get_or_create(&[("result", result)]).inc();
    }
}
