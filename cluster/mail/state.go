package mail

import (
	"time"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

// State is the mail-drain part of the replicated state. Apply is
// deterministic: time comes from the entry, never the local clock.
// It is not safe for concurrent use; the cluster's FSM serialises access.
type State struct{}

// NewState returns an empty state.
func NewState() *State { return &State{} }

// Apply applies one committed mail command at a Raft index, with the
// leader's time from the entry. A refusal goes in the result's Refusal.
func (s *State) Apply(index uint64, now time.Time, c *mailv1.Command) *fsmv1.Result {
	return &fsmv1.Result{Mail: &mailv1.Result{}}
}

// Snapshot returns a copy of the state for a Raft snapshot; later applies
// must not change what it returns.
func (s *State) Snapshot() *mailv1.Snapshot { return &mailv1.Snapshot{} }

// Restore builds a state from a snapshot.
func Restore(snap *mailv1.Snapshot) (*State, error) { return NewState(), nil }
