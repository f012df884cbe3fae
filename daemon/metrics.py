"""Every Prometheus metric of the daemon, defined once (prometheus client_python conventions).

Names carry the ``beamlens_`` prefix and base units (``_seconds``, ``_bytes``, ``_ratio``), counters
end in ``_total``, and no label takes a run uid, path or other unbounded value. The registry is
injected, so each test builds a fresh :class:`Metrics` on its own ``CollectorRegistry``.

Science gauges (explained variance, reconstruction error, defect counts, ...) are listed in
:data:`SCIENCE_GAUGES`; a consumer binds a ``single`` result buffer to one of them by name
(``BufferSpec(metric=...)``) and the daemon keeps the gauge equal to the buffer.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: name -> (documentation, label names besides ``consumer`` and ``index``).
SCIENCE_GAUGES: dict[str, str] = {
    "explained_variance_ratio": "Fraction of the spectra's variance explained by each principal component of the current run.",
    "reconstruction_error_ratio": "Relative reconstruction error ||X - WH||_F / ||X||_F of the unmixing over all "
                                  "spectra of the run so far (preprocessed as configured), 0..1.",
    "embedding_residual_ratio": "Off-manifold ratio of the newest spectra: median over the newest page of each spectrum's "
                                "locally-linear (barycentric) residual divided by the median residual of the spectra the "
                                "mLLE embedding was fitted on (about 1 when new spectra look like the fitted ones; the "
                                "consumer refits above refit_residual_ratio, 3 by default).",
    "unmixing_refit_sweeps": "HALS sweeps made by the latest background unmixing refit (its kept start).",
    "unmixing_refit_relative_change_ratio": "Relative loss decrease in the last HALS sweep of the latest unmixing refit (at most tol: converged).",
    "defects": "Defects detected in the newest frame, by class.",
    "defect_density_per_square_pixel": "Defects per px^2 in the newest frame.",
    "image_feature": "Features of the newest micrograph by feature (features consumer): void_area, mean_particle_area, "
                     "surface_layer_area (um^2, or px^2 without a pixel size), surface_layer_thickness, "
                     "mean_pore_diameter (um or px), void_fraction (0..1), particle_count.",
    "forecast_crossing": "Forecast x (the series' x units, e.g. cycles) at which the GP mean of a trended series reaches "
                         "its threshold (trends consumer); +Inf when not within the forecast horizon.",
    "forecast_crossing_pessimistic": "Forecast x at which the pessimistic 2-sigma bound of a trended series reaches its "
                                     "threshold (the early end of the forecast band); +Inf when not within the horizon.",
    "forecast_remaining": "Forecast crossing x of a trended series minus its latest x (x units, e.g. cycles to go); "
                          "+Inf when not within the horizon.",
    "forecast_alert_within": "The series' alert_within (x units): ForecastCrossesThreshold fires when "
                             "beamlens_forecast_remaining drops below it.",
}
#: Name of the gauge label that carries a buffer's ``labels`` (default ``index``).
SCIENCE_GAUGE_LABEL: dict[str, str] = {"image_feature": "feature", "forecast_crossing": "series",
                                       "forecast_crossing_pessimistic": "series", "forecast_remaining": "series",
                                       "forecast_alert_within": "series"}

#: Label values known before anything happens; :meth:`Metrics.declare` exports each counter at 0 for
#: them, so that ``increase()``/``rate()`` see the first burst (a series born at its first increment
#: has no earlier sample: a consumer that fails 10 times and is quarantined within one scrape would
#: otherwise never show an increase). Reasons raised elsewhere appear on first use.
DOCUMENT_TYPES = ("start", "descriptor", "event", "event_page", "stop")
QUARANTINE_REASONS = ("failures", "too_slow")
FRAME_DROP_REASONS = ("overflow", "stale_series", "run_closed", "gap", "shutdown")
RUN_EXIT_STATUSES = ("success", "abort", "fail", "incomplete")
CHECKPOINT_LABELS = (("save", "ok"), ("save", "failed"), ("restore", "ok"), ("restore", "failed"))
BAD_MESSAGE_REASONS = ("oversized", "malformed", "schema_invalid", "too_many_data_keys")
FRAME_DECODE_REASONS = ("oversized", "decoder_error")
POINT_SKIP_REASONS = ("wrong_shape",)   # raised for any consumer by the base class's shape check

AGE_BUCKETS = (1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
PROCESSING_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class Metrics:
    """The daemon's metrics on one registry.

    Args:
        registry: where to register; a fresh ``CollectorRegistry()`` by default (never the global
            one, so that several daemons can live in one test process).
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.documents_received = Counter(
            "beamlens_documents_received_total", "Bluesky documents received and accepted, by source and document type.",
            ["source", "type"], registry=r)
        self.bad_messages = Counter(
            "beamlens_bad_messages_total", "Messages or documents rejected, by source and reason.",
            ["source", "reason"], registry=r)
        self.events_processed = Counter(
            "beamlens_events_processed_total", "Events routed to the consumers of their run.", registry=r)
        self.points_skipped = Counter(
            "beamlens_points_skipped_total", "Scan points a consumer skipped as unusable, by consumer and reason.",
            ["consumer", "reason"], registry=r)
        self.consumer_failures = Counter(
            "beamlens_consumer_failures_total", "Exceptions raised by a consumer.", ["consumer"], registry=r)
        self.consumers_quarantined = Counter(
            "beamlens_consumers_quarantined_total",
            "Consumers stopped for the rest of a run: after repeated failures, or too slow to keep up.",
            ["consumer", "reason"], registry=r)
        self.events_missing = Counter(
            "beamlens_events_missing_total",
            "Events a run announced (RunStop num_events, seq_num gaps) that never arrived, e.g. lost upstream.",
            registry=r)
        self.checkpoints = Counter(
            "beamlens_checkpoints_total", "Run checkpoints written or restored, by operation and outcome.",
            ["operation", "outcome"], registry=r)
        self.runs_resumed = Counter(
            "beamlens_runs_resumed_total", "Open runs restored from a checkpoint after a restart.", registry=r)
        self.processing_seconds = Histogram(
            "beamlens_consumer_processing_seconds", "Time a consumer spent on one call on the router thread (method "
            "signal, process, results, finish, then, start, descriptor, stop) or one job on the daemon's pool (stage, submit).",
            ["consumer", "method"], buckets=PROCESSING_BUCKETS, registry=r)
        self.consumer_jobs = Counter(
            "beamlens_consumer_jobs_total", "Background jobs of consumers on the daemon's pool (method stage: per-batch "
            "stages; submit: run.submit jobs such as refits), by consumer, method and outcome (ok, failed, cancelled: "
            "the run ended first).", ["consumer", "method", "outcome"], registry=r)
        self.queue_depth = Gauge(
            "beamlens_queue_depth", "Items waiting in a daemon queue.", ["queue"], registry=r)
        self.run_progress = Gauge(
            "beamlens_run_progress_ratio", "Points processed / points expected for the newest open run (1 when it has stopped).",
            registry=r)
        self.runs_open = Gauge("beamlens_runs_open", "Runs started and not yet stopped.", registry=r)
        self.runs = Counter("beamlens_runs_total", "Runs seen, by how they ended.", ["exit_status"], registry=r)
        self.runs_joined_midway = Counter(
            "beamlens_runs_joined_midway_total", "Runs first seen after their RunStart (daemon joined mid-run).", registry=r)
        self.last_event_time = Gauge(
            "beamlens_last_event_timestamp_seconds", "Unix time at which the router last took an event page for its consumers, or they "
            "finished a detector-frame batch.", registry=r)
        self.source_connected = Gauge(
            "beamlens_source_connected", "1 while a source has a live connection to a peer (bluesky: after the 0MQ "
            "handshake; frame sources: while at least one peer connection is open), else 0.", ["source"], registry=r)
        self.handshake_failures = Counter(
            "beamlens_source_handshake_failures_total",
            "ZeroMQ handshakes that failed (wrong CURVE key, protocol mismatch), by source and reason.",
            ["source", "reason"], registry=r)
        self.probes_received = Counter(
            "beamlens_probes_received_total", "Readiness probes received through a bluesky proxy.", ["source"], registry=r)
        self.documents_published = Counter(
            "beamlens_documents_published_total", "Derived Bluesky documents published, by document type.",
            ["type"], registry=r)
        self.run_files_written = Counter(
            "beamlens_run_files_written_total", "Run files written completely and renamed into place.", registry=r)
        self.output_failures = Counter(
            "beamlens_output_failures_total", "Failures of an output (documents, files): results not published.",
            ["output"], registry=r)
        # -- detector frame path (one label value per configured frame source) -----------------
        self.frames_received = Counter(
            "beamlens_frames_received_total", "Detector images received from a frame stream, by source (series "
            "start/end messages not counted).", ["source"], registry=r)
        self.frame_bytes_received = Counter(
            "beamlens_frame_bytes_received_total", "Bytes of frame-stream messages received, by source.", ["source"], registry=r)
        self.frames_processed = Counter(
            "beamlens_frames_processed_total", "Frames decoded and handed to the frame consumers of their run, by source.",
            ["source"], registry=r)
        self.frames_dropped = Counter(
            "beamlens_frames_dropped_total",
            "Frames not analysed, by source and reason: overflow (skipped by policy latest), stale_series (not the "
            "source's current series), run_closed (after the run's stop), gap (missing frame numbers, lost before "
            "reaching beamlens), shutdown (decoded but the daemon stopped before analysing them).", ["source", "reason"], registry=r)
        self.frame_decode_errors = Counter(
            "beamlens_frame_decode_errors_total", "Frame-stream messages rejected by the decoder, by source and reason.",
            ["source", "reason"], registry=r)
        self.frame_series = Counter(
            "beamlens_frame_series_total", "Frame series started, by source and whether they joined a Bluesky run "
            "(attached) or became a frame-only run.", ["source", "attached"], registry=r)
        self.frame_age_seconds = Histogram(
            "beamlens_frame_age_seconds", "Time from receiving a frame (the newest of each batch) to its consumers having processed it.",
            ["source"], buckets=AGE_BUCKETS, registry=r)
        # -- isolation and limits (threat model) ------------------------------------------------
        self.internal_errors = Counter(
            "beamlens_internal_errors_total",
            "Exceptions in the daemon's own code caught by its isolation (the item or run was dropped, the thread went on), by component.",
            ["component"], registry=r)
        self.limit_actions = Counter(
            "beamlens_limit_actions_total",
            "Times a configured limit refused or downgraded something, by limit (memory_budget, open_runs, run_start_rate, "
            "series_start_rate, data_keys, gap, retention) and action (refused, rolling_window, closed_oldest, released, ...).",
            ["limit", "action"], registry=r)
        self.metric_samples_skipped = Counter(
            "beamlens_metric_samples_skipped_total",
            "Samples of a daemon metric for a trends series (key metric/<name>{...}) not stored, by series key and "
            "reason: no_match (no sample with the matcher's labels yet), ambiguous (more than one matches), "
            "not_finite.", ["series", "reason"], registry=r)
        self.result_buffer_bytes = Gauge(
            "beamlens_result_buffer_bytes", "Bytes of result buffers held by open and kept runs (counted against limits.memory_budget_mib).",
            registry=r)
        self.science = {
            name: Gauge(f"beamlens_{name}", doc, ["consumer", SCIENCE_GAUGE_LABEL.get(name, "index")], registry=r)
            for name, doc in SCIENCE_GAUGES.items()
        }
        # -- Kafka sources (consumer groups) ----------------------------------------------------
        self.kafka_consumer_lag = Gauge(
            "beamlens_kafka_consumer_lag_messages",
            "Messages in a Kafka partition this instance owns that it has not yet read (high watermark - position), "
            "by source, topic and partition.", ["source", "topic", "partition"], registry=r)
        self.kafka_partitions = Gauge(
            "beamlens_kafka_partitions_assigned", "Kafka partitions this group member owns, by source.", ["source"], registry=r)
        self.kafka_rebalances = Counter(
            "beamlens_kafka_rebalances_total",
            "Consumer-group rebalances seen, by source and what they did here: assign, revoke, lost (revoked without "
            "a chance to hand over, e.g. after a session timeout).", ["source", "kind"], registry=r)
        self.kafka_duplicates = Counter(
            "beamlens_kafka_duplicates_dropped_total",
            "Documents read again from Kafka (redelivery after a rebalance or restart, producer retries) and dropped "
            "because their run already holds them, by source and document type.", ["source", "type"], registry=r)
        self.kafka_commits = Counter(
            "beamlens_kafka_commits_total", "Offset commits to the consumer group, by source and outcome (ok, failed).",
            ["source", "outcome"], registry=r)
        # -- HTTP server -----------------------------------------------------------------------
        self.http_connections = Gauge(
            "beamlens_http_connections", "Open HTTP connections (live-page streams included).", registry=r)
        self.http_connections_closed = Counter(
            "beamlens_http_connections_closed_total",
            "HTTP connections the server closed itself, by reason: idle (keep-alive or never used, past "
            "keepalive_timeout_s), header_timeout (request headers not complete in time), shed (closed to stay "
            "under max_connections, longest-idle first), refused (over max_connections with none idle), "
            "stream_stalled (a live-page client that does not read).", ["reason"], registry=r)
        self.http_requests_refused = Counter(
            "beamlens_http_requests_refused_total",
            "HTTP requests answered with an error before reaching a handler, by reason: host (Host header not "
            "allowed), streams_full (every live-page slot held by a reading client).", ["reason"], registry=r)
        for reason in ("idle", "header_timeout", "shed", "refused", "stream_stalled"):
            self.http_connections_closed.labels(reason)
        for reason in ("host", "streams_full"):
            self.http_requests_refused.labels(reason)

    def declare(self, bluesky_sources: list[str], frame_sources: list[str], consumers: list[str],
                kafka_sources: list[str] = ()) -> None:
        """Export every counter at 0, and every ``beamlens_source_connected`` at 0, for the label
        values known from the config (source and consumer names) and the fixed reason lists above.
        Kafka sources are also document sources (pass them in ``bluesky_sources`` too).

        Called once at daemon start, before any source connects. Idempotent.
        """
        for source in bluesky_sources:
            self.source_connected.labels(source).set(0)
            self.probes_received.labels(source)
            for doc_type in DOCUMENT_TYPES:
                self.documents_received.labels(source, doc_type)
            for reason in BAD_MESSAGE_REASONS:
                self.bad_messages.labels(source, reason)
        for source in frame_sources:
            self.source_connected.labels(source).set(0)
            for counter in (self.frames_received, self.frame_bytes_received, self.frames_processed):
                counter.labels(source)
            for reason in FRAME_DROP_REASONS:
                self.frames_dropped.labels(source, reason)
            for reason in FRAME_DECODE_REASONS:
                self.frame_decode_errors.labels(source, reason)
            for attached in ("yes", "no"):
                self.frame_series.labels(source, attached)
        for consumer in consumers:
            self.consumer_failures.labels(consumer)
            for reason in POINT_SKIP_REASONS:
                self.points_skipped.labels(consumer, reason)
            for reason in QUARANTINE_REASONS:
                self.consumers_quarantined.labels(consumer, reason)
        for status in RUN_EXIT_STATUSES:
            self.runs.labels(status)
        for source in kafka_sources:
            self.kafka_partitions.labels(source).set(0)
            for kind in ("assign", "revoke", "lost"):
                self.kafka_rebalances.labels(source, kind)
            for doc_type in DOCUMENT_TYPES:
                self.kafka_duplicates.labels(source, doc_type)
            for outcome in ("ok", "failed"):
                self.kafka_commits.labels(source, outcome)
        for operation, outcome in CHECKPOINT_LABELS:
            self.checkpoints.labels(operation, outcome)
