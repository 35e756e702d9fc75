"""Recovering the newest committed state from what the group holds in memory, with no storage read.

- peer_sync: a replicated state: agree on which rank holds the newest snapshot and send it to all.
- buddy: a sharded (FSDP2) state: each rank keeps a copy of one other rank's rows in host memory.
- reshard: pure plans that move the held rows onto a new group's layout, and their execution.
- sharded_state: restoring and finally saving a sharded state from the rows and the buddy copies.
"""
