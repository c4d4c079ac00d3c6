// Package dbtarget holds which PostgreSQL server is the primary, the
// generation that fences it and the phase of any switchover or failover, as
// part of gitraft's replicated state (a deterministic State the cluster's
// state machine embeds), and the agents that drive pgbouncer and PostgreSQL.
package dbtarget
