"""The policy API: what a user implements to change what the supervisor decides.

`ElasticTrainer(train, ..., policy=...)` takes any object with the methods of `Policy`; each
method is shown the run's config, a view of the controller's bookkeeping and the workers' health,
and returns one of the frozen decisions below (it must not touch actors, sleep or read a clock).
`DefaultPolicy` is elastic's own, its timings documented fields: subclass it, or pass
`DefaultPolicy(settle_s=5.0)` to change one. The implementations live in elastic._internal and may
move; these names are the stable ones.
"""

from elastic._internal.supervisor.decisions import (Build, Continue, Decision, Fail, Finish, Policy, Remove, Resize,
                                                    ResizeReason, Restart, Retry, WaitForWorkers)
from elastic._internal.supervisor.policy import (DefaultPolicy, Health, MembershipView, QuiesceView, RunningView,
                                                 StartView)

__all__ = ["Build", "Continue", "Decision", "DefaultPolicy", "Fail", "Finish", "Health", "MembershipView", "Policy",
           "QuiesceView", "Remove", "Resize", "ResizeReason", "Restart", "Retry", "RunningView", "StartView",
           "WaitForWorkers"]
