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
    "reconstruction_error_ratio": "Relative reconstruction error ||X - WH|| / ||X|| of the current run's unmixing.",
    "embedding_residual_ratio": "Relative out-of-sample reconstruction residual of the newest spectra in the current embedding.",
    "defects": "Defects detected in the newest frame, by class.",
    "defect_density_per_square_pixel": "Defects per px^2 in the newest frame.",
}

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
            "beamlens_consumer_processing_seconds", "Time a consumer spent on one document or page.",
            ["consumer", "method"], buckets=PROCESSING_BUCKETS, registry=r)
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
            "beamlens_last_event_timestamp_seconds", "Unix time at which the last event or detector frame was processed.", registry=r)
        self.source_connected = Gauge(
            "beamlens_source_connected", "1 while a source has a live connection to its peer.", ["source"], registry=r)
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
            "beamlens_frames_received_total", "Frame messages received from a detector stream, by source.", ["source"], registry=r)
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
        self.result_buffer_bytes = Gauge(
            "beamlens_result_buffer_bytes", "Bytes of result buffers held by open and kept runs (counted against limits.memory_budget_mib).",
            registry=r)
        self.science = {
            name: Gauge(f"beamlens_{name}", doc, ["consumer", "index"], registry=r)
            for name, doc in SCIENCE_GAUGES.items()
        }
