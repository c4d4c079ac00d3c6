package dbtarget

import (
	"time"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// State is the PostgreSQL failover-target part of the replicated state. Apply is
// deterministic: time comes from the entry, never the local clock.
// It is not safe for concurrent use; the cluster's FSM serialises access.
type State struct{}

// NewState returns an empty state.
func NewState() *State { return &State{} }

// Apply applies one committed database command at a Raft index, with the
// leader's time from the entry. A refusal goes in the result's Refusal.
func (s *State) Apply(index uint64, now time.Time, c *dbv1.Command) *fsmv1.Result {
	return &fsmv1.Result{Database: &dbv1.Result{}}
}

// Snapshot returns a copy of the state for a Raft snapshot; later applies
// must not change what it returns.
func (s *State) Snapshot() *dbv1.Snapshot { return &dbv1.Snapshot{} }

// Restore builds a state from a snapshot.
func Restore(snap *dbv1.Snapshot) (*State, error) { return NewState(), nil }
