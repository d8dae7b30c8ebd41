"""Consumer-group coordination as pure state machines (no I/O; time comes in as ``now_ms``).

* :mod:`.group` -- :class:`GroupCoordinator`: membership, KIP-848-style incremental rebalancing
  (server-side target assignment, per-member reconciliation, epochs for fencing), static
  membership, commit validation, admin views.
* :mod:`.assignors` -- the server-side assignors (range, roundrobin, sticky) as pure functions.

Committed offsets themselves are stored by ``shmbroker.storage.offset_log``; the supervisor asks
:meth:`GroupCoordinator.validate_commit` before it appends one.
"""

from shmbroker.coordinator.assignors import (
    ASSIGNORS,
    Assignor,
    MemberSpec,
    TopicPartition,
    assignment_problems,
    range_assign,
    roundrobin_assign,
    sticky_assign,
)
from shmbroker.coordinator.group import (
    ExpiredMember,
    ExpiryReason,
    GroupCoordinator,
    GroupDescription,
    GroupListing,
    GroupState,
    HeartbeatResponse,
    MemberDescription,
    MemberState,
    Subscription,
)

__all__ = [
    "ASSIGNORS", "Assignor", "MemberSpec", "TopicPartition", "assignment_problems",
    "range_assign", "roundrobin_assign", "sticky_assign", "ExpiredMember", "ExpiryReason",
    "GroupCoordinator", "GroupDescription", "GroupListing", "GroupState", "HeartbeatResponse",
    "MemberDescription", "MemberState", "Subscription",
]
