package cluster

import (
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/protobuf/proto"

	"github.com/gitraft/gitraft/cluster/replica"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// metrics are a node's Prometheus metrics, in a registry of its own so that
// several nodes can share a process (gitraft dev, tests).
type metrics struct {
	reg           *prometheus.Registry
	leaderChanges prometheus.Counter
	applySeconds  *prometheus.HistogramVec
	commitSeconds *prometheus.HistogramVec
	lockGrants    prometheus.Counter
	locksExpired  prometheus.Counter
	locksFreed    *prometheus.CounterVec
	refusals      *prometheus.CounterVec
	sizeSnapshots prometheus.Counter
	promotions    prometheus.Counter
}

func newMetrics(n *Node) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.leaderChanges = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "gitraft_raft_leader_changes_total", Help: "Leadership changes seen by this node (gained or lost).",
	})
	m.applySeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "gitraft_fsm_apply_seconds", Help: "Time to apply one committed entry to the state machine.",
		Buckets: prometheus.ExponentialBuckets(1e-6, 4, 10),
	}, []string{"command"})
	m.commitSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "gitraft_propose_seconds", Help: "Time from proposing an entry on this node until it was committed and applied.",
		Buckets: prometheus.ExponentialBuckets(1e-4, 2, 16),
	}, []string{"command"})
	m.lockGrants = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "gitraft_lock_grants_total", Help: "Write locks granted (applied on this node).",
	})
	m.locksExpired = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "gitraft_lock_expired_total", Help: "Write locks expired by the leader while this node led.",
	})
	m.locksFreed = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "gitraft_lock_freed_total", Help: "Write locks freed before their lease ran out because their holder's node restarted or went silent (applied on this node).",
	}, []string{"reason"})
	m.refusals = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "gitraft_fsm_refusals_total", Help: "Committed entries the state machine refused (stale ref, lock held, ...).",
	}, []string{"reason"})
	m.sizeSnapshots = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "gitraft_raft_size_snapshots_total", Help: "Snapshots taken because the log since the last one reached raft.snapshot_bytes.",
	})
	m.promotions = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "gitraft_members_promoted_total", Help: "Non-voters this node promoted to voter while it led (each once it held every repository).",
	})
	m.reg.MustRegister(m.leaderChanges, m.applySeconds, m.commitSeconds, m.lockGrants, m.locksExpired, m.locksFreed, m.refusals, m.sizeSnapshots, m.promotions)

	gauge := func(name, help string, fn func() float64) {
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, fn))
	}
	gauge("gitraft_fsm_applied_index", "Last Raft index applied to the state machine.", func() float64 { return float64(n.fsm.Index()) })
	gauge("gitraft_raft_bytes_since_snapshot", "Bytes of the entries applied since the last snapshot: what a restart replays from the log. A snapshot is taken when it reaches raft.snapshot_bytes.", func() float64 {
		return float64(n.fsm.BytesSinceSnapshot())
	})
	gauge("gitraft_repos", "Repositories in the replicated state.", func() float64 {
		var c int
		n.fsm.Read(func(s *State) { c = len(s.repos) })
		return float64(c)
	})
	gauge("gitraft_locks_held", "Write locks in the replicated state.", func() float64 {
		var c int
		n.fsm.Read(func(s *State) { c = s.locks.Len() })
		return float64(c)
	})
	gauge("gitraft_lock_oldest_age_seconds", "Seconds since the oldest write lock in the replicated state was granted (by this node's clock; 0 when none is held). A push holds its lock, renewing the lease, until it is committed.", func() float64 {
		var oldest time.Time
		n.fsm.Read(func(s *State) {
			for _, l := range s.locks.List() {
				if oldest.IsZero() || l.AcquiredAt.Before(oldest) {
					oldest = l.AcquiredAt
				}
			}
		})
		if oldest.IsZero() {
			return 0
		}
		return max(0, time.Since(oldest).Seconds())
	})
	lastBackup := func(fn func(b *fsmv1.BackupRecord) float64) func() float64 {
		return func() float64 {
			var b *fsmv1.BackupRecord
			n.fsm.Read(func(s *State) { b = s.LastBackup() })
			if b == nil {
				return 0
			}
			return fn(b)
		}
	}
	gauge("gitraft_backup_last_success_timestamp_seconds", "Unix time at which the last backup (gitraft backup create) finished, from the replicated state: the same on every node. 0 before the first.", lastBackup(func(b *fsmv1.BackupRecord) float64 {
		return float64(b.GetFinishedUnixNano()) / 1e9
	}))
	gauge("gitraft_backup_last_duration_seconds", "How long the last backup took.", lastBackup(func(b *fsmv1.BackupRecord) float64 {
		return time.Duration(b.GetDurationNanos()).Seconds()
	}))
	gauge("gitraft_backup_last_size_bytes", "Size of the last backup: its state and every pack it names.", lastBackup(func(b *fsmv1.BackupRecord) float64 { return float64(b.GetBytes()) }))
	gauge("gitraft_backup_last_written_bytes", "Bytes the last backup wrote (an incremental backup writes only the packs its destination lacked).", lastBackup(func(b *fsmv1.BackupRecord) float64 {
		return float64(b.GetBytesWritten())
	}))
	gauge("gitraft_backup_last_index", "Raft index of the state the last backup holds.", lastBackup(func(b *fsmv1.BackupRecord) float64 { return float64(b.GetIndex()) }))
	gauge("gitraft_ready", "1 when this node is ready (not halted, leader known, caught up since start).", func() float64 {
		if n.ready.Load() && n.fsm.Halted() == nil {
			return 1
		}
		return 0
	})
	gauge("gitraft_repos_behind", "Repositories whose copy on this node is behind the replicated state (catching up).", func() float64 {
		if n.git == nil {
			return 0
		}
		b, _, _ := n.git.Health()
		return float64(b)
	})
	gauge("gitraft_repos_stuck", "Repositories whose copy on this node has failed to catch up for over 2 minutes; /readyz is 503 while any is.", func() float64 {
		if n.git == nil {
			return 0
		}
		_, st, _ := n.git.Health()
		return float64(st)
	})
	scrub := func() replica.ScrubStats {
		if n.git == nil {
			return replica.ScrubStats{}
		}
		return n.git.ScrubStats()
	}
	counter := func(name, help string, fn func() float64) {
		m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, fn))
	}
	gauge("gitraft_scrub_last_completed_timestamp_seconds", "When this node's last whole scrub pass finished (unix time; 0: never). Alert when it is older than a few git.scrub.interval.", func() float64 {
		if t := scrub().LastCompleted; !t.IsZero() {
			return float64(t.Unix())
		}
		return 0
	})
	counter("gitraft_scrub_repos_total", "Repository copies this node's scrub checked.", func() float64 { return float64(scrub().Repos) })
	counter("gitraft_scrub_bytes_total", "Bytes of packs and indexes this node's scrub read and checked.", func() float64 { return float64(scrub().Bytes) })
	counter("gitraft_scrub_damaged_total", "Copies this node's scrub found damaged (lost objects, bad checksums, refs that differ from the state).", func() float64 { return float64(scrub().Damaged) })
	counter("gitraft_heal_total", "Damaged copies this node healed from a current peer.", func() float64 { return float64(scrub().Healed) })
	counter("gitraft_heal_failures_total", "Attempts to heal a damaged copy that failed (retried by the reconciler).", func() float64 { return float64(scrub().HealFailed) })
	gauge("gitraft_repos_damaged", "Repository copies on this node marked damaged and not yet healed; they serve no reads.", func() float64 { return float64(scrub().DamagedNow) })
	gauge("gitraft_fsm_halted", "1 when the state machine halted on a committed entry this binary does not know: upgrade this node.", func() float64 {
		if n.fsm.Halted() != nil {
			return 1
		}
		return 0
	})
	gauge("gitraft_fsm_halted_index", "Index of the entry the state machine halted on (0 when not halted).", func() float64 {
		if h := n.fsm.Halted(); h != nil {
			return float64(h.Index)
		}
		return 0
	})
	m.reg.MustRegister(housekeepingCollector{n})
	return m
}

// housekeepingCollector exports a node's housekeeping figures, when it
// keeps repositories. Packs and loose objects are sums and maxima over the
// node's copies, not a series per repository (a node may hold 10,000).
type housekeepingCollector struct{ n *Node }

var (
	hkLastRunDesc = prometheus.NewDesc("gitraft_housekeeping_last_run_timestamp_seconds",
		"When this node's housekeeping last went through every repository without a failure (its start, before the first pass).", nil, nil)
	hkRunsDesc = prometheus.NewDesc("gitraft_housekeeping_runs_total",
		"Housekeeping runs of single repositories on this node (scheduled and from gitraft repo housekeep).", nil, nil)
	hkFailuresDesc = prometheus.NewDesc("gitraft_housekeeping_failures_total",
		"Housekeeping runs on this node that failed (see the node's log).", nil, nil)
	hkPacksDesc = prometheus.NewDesc("gitraft_repo_packs",
		"Packs in the repositories on this node, as housekeeping last read them: their sum (agg=\"sum\") and the most in one repository (agg=\"max\").", []string{"agg"}, nil)
	hkLooseDesc = prometheus.NewDesc("gitraft_repo_loose_objects",
		"Loose objects in the repositories on this node, as housekeeping last read them: their sum (agg=\"sum\") and the most in one repository (agg=\"max\").", []string{"agg"}, nil)
)

func (c housekeepingCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{hkLastRunDesc, hkRunsDesc, hkFailuresDesc, hkPacksDesc, hkLooseDesc} {
		ch <- d
	}
}

func (c housekeepingCollector) Collect(ch chan<- prometheus.Metric) {
	if c.n.git == nil {
		return
	}
	st := c.n.git.HousekeepStats()
	if !st.LastPass.IsZero() {
		ch <- prometheus.MustNewConstMetric(hkLastRunDesc, prometheus.GaugeValue, float64(st.LastPass.Unix()))
	}
	ch <- prometheus.MustNewConstMetric(hkRunsDesc, prometheus.CounterValue, float64(st.Runs))
	ch <- prometheus.MustNewConstMetric(hkFailuresDesc, prometheus.CounterValue, float64(st.Failures))
	ch <- prometheus.MustNewConstMetric(hkPacksDesc, prometheus.GaugeValue, float64(st.PacksSum), "sum")
	ch <- prometheus.MustNewConstMetric(hkPacksDesc, prometheus.GaugeValue, float64(st.PacksMax), "max")
	ch <- prometheus.MustNewConstMetric(hkLooseDesc, prometheus.GaugeValue, float64(st.LooseSum), "sum")
	ch <- prometheus.MustNewConstMetric(hkLooseDesc, prometheus.GaugeValue, float64(st.LooseMax), "max")
}

// watchRaft registers gauges read from Raft itself.
func (m *metrics) watchRaft(r *raft.Raft) {
	gauge := func(name, help string, fn func() float64) {
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, fn))
	}
	gauge("gitraft_raft_term", "Current Raft term.", func() float64 { return float64(r.CurrentTerm()) })
	gauge("gitraft_raft_commit_index", "Raft commit index known to this node.", func() float64 { return float64(r.CommitIndex()) })
	gauge("gitraft_raft_applied_index", "Raft applied index (as Raft tracks it).", func() float64 { return float64(r.AppliedIndex()) })
	gauge("gitraft_raft_last_index", "Last index in this node's Raft log.", func() float64 { return float64(r.LastIndex()) })
	gauge("gitraft_raft_nonvoters", "Members in the Raft configuration that do not vote yet: joined, filling their disk, promoted by the leader once they hold every repository.", func() float64 {
		f := r.GetConfiguration()
		if f.Error() != nil {
			return 0
		}
		c := 0
		for _, s := range f.Configuration().Servers {
			if s.Suffrage != raft.Voter {
				c++
			}
		}
		return float64(c)
	})
	gauge("gitraft_raft_leader", "1 when this node is the leader.", func() float64 {
		if r.State() == raft.Leader {
			return 1
		}
		return 0
	})
	for _, st := range []raft.RaftState{raft.Follower, raft.Candidate, raft.Leader, raft.Shutdown} {
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "gitraft_raft_state", Help: "Raft state of this node (1 for the current state).", ConstLabels: prometheus.Labels{"state": st.String()},
		}, func() float64 {
			if r.State() == st {
				return 1
			}
			return 0
		}))
	}
}

func commandName(e *fsmv1.Entry) string {
	switch e.Command.(type) {
	case *fsmv1.Entry_CreateRepo:
		return "create_repo"
	case *fsmv1.Entry_DeleteRepo:
		return "delete_repo"
	case *fsmv1.Entry_UpdateRefs:
		return "update_refs"
	case *fsmv1.Entry_AcquireLock:
		return "acquire_lock"
	case *fsmv1.Entry_RenewLock:
		return "renew_lock"
	case *fsmv1.Entry_ReleaseLock:
		return "release_lock"
	case *fsmv1.Entry_ForceReleaseLock:
		return "force_release_lock"
	case *fsmv1.Entry_ExpireLocks:
		return "expire_locks"
	case *fsmv1.Entry_SetMember:
		return "set_member"
	case *fsmv1.Entry_RemoveMember:
		return "remove_member"
	case *fsmv1.Entry_FreeNodeLocks:
		return "free_node_locks"
	case *fsmv1.Entry_LeaveLockQueue:
		return "leave_lock_queue"
	case *fsmv1.Entry_LeaderNoop:
		return "leader_noop"
	case *fsmv1.Entry_SetHostKey:
		return "set_host_key"
	case *fsmv1.Entry_ForgetHostPrivateKey:
		return "forget_host_private_key"
	case *fsmv1.Entry_RecordBackup:
		return "record_backup"
	case *fsmv1.Entry_AddUser:
		return "add_user"
	case *fsmv1.Entry_RemoveUser:
		return "remove_user"
	case *fsmv1.Entry_AddKey:
		return "add_key"
	case *fsmv1.Entry_RemoveKey:
		return "remove_key"
	case *fsmv1.Entry_SetGrant:
		return "set_grant"
	case *fsmv1.Entry_Database:
		return "db_" + innerCommandName(e.GetDatabase())
	case *fsmv1.Entry_Mail:
		return "mail_" + innerCommandName(e.GetMail())
	}
	return "unknown"
}

// innerCommandName names the command set in a domain's Command message (its
// one oneof), e.g. "drain" for a mail Command carrying a Drain.
func innerCommandName(m proto.Message) string {
	r := m.ProtoReflect()
	oneofs := r.Descriptor().Oneofs()
	if oneofs.Len() == 0 {
		return "unknown"
	}
	if f := r.WhichOneof(oneofs.Get(0)); f != nil {
		return string(f.Name())
	}
	return "unknown"
}

func (m *metrics) observeApply(e *fsmv1.Entry, r *fsmv1.Result, took time.Duration) {
	m.applySeconds.WithLabelValues(commandName(e)).Observe(took.Seconds())
	if rf := r.GetRefusal(); rf != nil {
		m.refusals.WithLabelValues(rf.GetReason().String()).Inc()
	} else if _, ok := e.Command.(*fsmv1.Entry_AcquireLock); ok {
		m.lockGrants.Inc()
	}
	if n := len(r.GetFreed()); n > 0 {
		m.locksFreed.WithLabelValues(freedReason(e)).Add(float64(n))
	}
}

// freedReason is why an entry freed locks: "restarted" (the holder's node
// came back under a new incarnation) or "unreachable" (the leader stopped
// hearing from it).
func freedReason(e *fsmv1.Entry) string {
	if _, ok := e.Command.(*fsmv1.Entry_FreeNodeLocks); ok {
		return "unreachable"
	}
	return "restarted"
}

func (m *metrics) observePropose(e *fsmv1.Entry, took time.Duration) {
	m.commitSeconds.WithLabelValues(commandName(e)).Observe(took.Seconds())
}
