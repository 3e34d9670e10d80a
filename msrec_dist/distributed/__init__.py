"""Everything about more than one process: process group, sharding, DMP, gradient sync,
collectives, replicated tables, local lookup, checkpoints."""
