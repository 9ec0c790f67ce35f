"""What a Ray Train run restarts after: a lost node or spot instance, a crashed worker, from its last checkpoint and
up to `MAX_FAILURES` times; not bad input, which fails the same way after every restart.

Ray Train's default policy retries any worker's error up to `FailureConfig.max_failures`: a UserError (an unreadable
image, a checkpoint that does not fit) would reach the user only after every worker restarted that many times.
Ray chooses the policy inside `DataParallelTrainer.fit` and takes no other (no Ray issue covers it):
`ray_workarounds.restarts_for_failures_only` puts this one there. This module imports nothing of glit_ray and is
pickled by value: Ray Train's controller unpickles the policy, and importing glit_ray there (torch, timm) would cost
every run 3 s before its workers start.
"""
from __future__ import annotations

import ray.cloudpickle
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

# worker-group failures a run survives (each restarts every worker from the last checkpoint); Ray's own count of the
# preemptions it was warned of (`max_preemption_failures`) stays unlimited
MAX_FAILURES = 3


class BadInputIsNotRetried(DefaultFailurePolicy):
    """Ray's policy, except that a worker's UserError ends the run at once (matched by name: glit_ray.core.errors would
    import glit_ray in the controller)."""

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if isinstance(training_failed_error, WorkerGroupError) and any(
                type(failure).__name__ == "UserError" for failure in training_failed_error.worker_failures.values()):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


ray.cloudpickle.register_pickle_by_value(__import__(__name__, fromlist=["_"]))
