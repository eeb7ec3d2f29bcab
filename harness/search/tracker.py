"""A study in MLflow: one parent run per study (search.parent), one child run per trial (search.recorder)."""
from __future__ import annotations

from .. import tracking
from ..urls import is_http
from ..sink import MlflowSink
from .options import TrialOptions
from .parent import ParentRun
from ..errors import first_line
from .recorder import TrackingFailed, TrialRecorder
from .status import LiveStatus


class StudyTracker:
    """One invocation's tracking of a study: its parent run, and the recorder of its trials' runs;
    ``close`` writes the study's summary once every trial's run is in the store."""

    def __init__(self, study, options: TrialOptions, client=None):
        """``client``: the MLflow client the caller opened already (`harness search` checks the store
        with it); else one is opened here."""
        uri = tracking.default_tracking_uri()
        if client is None:
            try:
                client = tracking.open_client(uri)
            except Exception as exc:
                raise TrackingFailed(f"cannot open the MLflow store: {first_line(exc)}") from None
        sink = MlflowSink(client, options.sql_writer(client) if options.sql_writer else None)
        self.objectives = options.objectives
        self.parent = ParentRun.open(sink, study, options)
        try:  # once per process: the trials' runs carry the same tags, and point here for the artifacts
            tracking.log_provenance(client, self.parent.run_id, options.experiment, options.data, options.base.device,
                                    options.base.valid_fraction)
        except Exception as exc:
            raise TrackingFailed(f"cannot log the study's provenance: {first_line(exc)}") from None
        self.status = LiveStatus(self.parent, options.objectives)  # the running trials, while they train
        self.recorder = TrialRecorder(sink, study, self.parent.experiment_id, self.parent.run_id,
                                      experiment=options.experiment, data=options.data, objectives=options.objectives,
                                      trial_figures=options.trial_figures,
                                      server=is_http(uri), status=self.status)

    def close(self) -> list[BaseException]:
        """Close abandoned trials' runs, wait for every write to land, and write the study's summary
        to its parent run. Returns the errors of writes that failed, then the experiment's code's
        asking to stop while its figures were drawn (TrialRecorder.stopped).

        Runs whose final write failed are closed as incomplete, and a completed trial among them is
        queued again, so that its configuration gets a full record."""
        recorder = self.recorder
        self.status.close()  # before the summary, which replaces the live description
        try:
            recorder.drain()
        finally:  # whatever drain raised: the parent run is closed all the same
            try:  # also after a failed write: the store may take this one, and the parent is then closed
                self.parent.write_summary(recorder.best, self.objectives)
            except Exception as exc:  # what it could not write is left to `harness audit --fix`
                recorder.failed(exc)
        errors = [e for e in (recorder.failure, recorder.stopped) if e is not None]
        recorder.close_unwritten()
        return errors
