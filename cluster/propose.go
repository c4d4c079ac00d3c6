package cluster

import (
	"context"
	crand "crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	nodev1 "github.com/gitraft/gitraft/proto/gitraft/node/v1"
)

var errLeaderNotReady = errors.New("the new leader has not committed an entry of its term yet")

// maxLeaderBackoff caps the wait between tries while there is no leader (or
// the one known is gone): a try costs little (no leader known, or a
// connection refused at once), and a write should find a new leader within
// a heartbeat or so of its election.
const maxLeaderBackoff = 100 * time.Millisecond

// applyTimeout bounds how long the leader waits to enqueue one entry.
const applyTimeout = 10 * time.Second

func newRequestID() string {
	var b [12]byte
	if _, err := cryptoRandRead(b[:]); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b[:])
}

var cryptoRandRead = crand.Read

// Propose commits an entry through the Raft leader and returns the result
// of applying it. On a follower it forwards the entry to the leader. While
// there is no leader it retries with jittered backoff for up to LeaderWait
// (or until ctx ends), then fails with ErrNoLeader. Retries carry the same
// request id, so an entry whose answer was lost is never applied twice.
//
// An entry that fails validateEntry is refused with ErrInvalidEntry here,
// and again by the leader, before it reaches the log.
func (n *Node) Propose(ctx context.Context, e *fsmv1.Entry) (*fsmv1.Result, error) {
	if err := validateEntry(e, "node "+n.cfg.NodeID, n.cfg.Version); err != nil {
		return nil, err
	}
	if e.GetRequestId() == "" {
		e = proto.CloneOf(e)
		e.RequestId = newRequestID()
	}
	start := time.Now()
	deadline := start.Add(n.cfg.LeaderWait)
	backoff := 25 * time.Millisecond
	var lastErr error
	for attempt := 0; ; attempt++ {
		r, retry, err := n.proposeOnce(ctx, e)
		if err == nil {
			n.metrics.observePropose(e, time.Since(start))
			return r, nil
		}
		if !retry {
			return nil, err
		}
		lastErr = err
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%w: no leader could take the write for %s (last: %v); is a majority of nodes up?", ErrNoLeader, n.cfg.LeaderWait, lastErr)
		}
		sleep := backoff/2 + rand.N(backoff/2+1)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: %v (last: %v)", ErrNoLeader, ctx.Err(), lastErr)
		case <-time.After(sleep):
		}
		backoff = min(backoff*2, maxLeaderBackoff)
	}
}

// proposeOnce tries once; retry says whether trying again is safe and useful.
func (n *Node) proposeOnce(ctx context.Context, e *fsmv1.Entry) (*fsmv1.Result, bool, error) {
	if n.raft.State() == raft.Leader {
		r, err := n.applyLocal(e)
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) || errors.Is(err, raft.ErrEnqueueTimeout) {
			return nil, true, err
		}
		return r, false, err
	}
	addr, id := n.leaderGRPC()
	if addr == "" {
		return nil, true, fmt.Errorf("%w known to %s", ErrNoLeader, n.cfg.NodeID)
	}
	client, err := n.peers.node(addr)
	if err != nil {
		return nil, true, err
	}
	resp, err := client.Propose(ctx, &nodev1.ProposeRequest{Entry: e})
	if err != nil {
		switch status.Code(err) {
		case codes.Unavailable, codes.FailedPrecondition, codes.DeadlineExceeded:
			if ctx.Err() != nil {
				return nil, false, err
			}
			return nil, true, fmt.Errorf("forward to leader %s at %s: %w", id, addr, err)
		}
		return nil, false, err
	}
	return resp.GetResult(), false, nil
}

// applyLocal appends the entry on this (leader) node and waits for it to be
// applied here. It is the only caller of raft.Apply: it refuses an entry
// that fails validateEntry or needs a feature level some member has not
// reported (checkFeatureLevel) with ErrInvalidEntry, and any entry while this
// node's state machine is halted (ErrHalted), since it could not tell the
// proposer the result.
func (n *Node) applyLocal(e *fsmv1.Entry) (*fsmv1.Result, error) {
	if err := validateEntry(e, "leader "+n.cfg.NodeID, n.cfg.Version); err != nil {
		return nil, err
	}
	if h := n.fsm.Halted(); h != nil {
		return nil, fmt.Errorf("leader %s takes no writes: %w", n.cfg.NodeID, h.err())
	}
	if err := n.checkFeatureLevel(e); err != nil {
		return nil, err
	}
	e = proto.CloneOf(e)
	e.Format = fsmv1.EntryFormat_ENTRY_FORMAT_V1
	e.LeaderTimeUnixNano = time.Now().UnixNano()
	if e.Proposer == "" {
		e.Proposer = n.cfg.NodeID
	}
	b, err := proto.Marshal(e)
	if err != nil {
		return nil, fmt.Errorf("encode entry: %w", err)
	}
	f := n.raft.Apply(b, applyTimeout)
	if err := f.Error(); err != nil {
		return nil, err
	}
	switch r := f.Response().(type) {
	case *fsmv1.Result:
		return r, nil
	case error:
		return nil, r
	default:
		return nil, fmt.Errorf("apply returned %T", f.Response())
	}
}

// leaderGRPC returns the leader's gRPC address and ID, or "" if unknown.
func (n *Node) leaderGRPC() (addr, id string) {
	_, lid := n.raft.LeaderWithID()
	if lid == "" {
		return "", ""
	}
	n.fsm.Read(func(s *State) {
		if m, ok := s.Member(string(lid)); ok {
			addr = m.GetGrpcAddr()
		}
	})
	return addr, string(lid)
}

// ReadBarrier makes the next read of this node's state linearizable: it
// learns the leader's commit index (after the leader confirmed it still
// leads) and waits until this node has applied it. It returns that index.
//
// A node whose state machine halted fails at once with ErrHalted: its state
// stops at an entry it could not apply, so it cannot serve a current read.
func (n *Node) ReadBarrier(ctx context.Context) (uint64, error) {
	if h := n.fsm.Halted(); h != nil {
		return 0, h.err()
	}
	ctx, cancel := context.WithTimeout(ctx, n.cfg.LeaderWait)
	defer cancel()
	backoff := 25 * time.Millisecond
	for {
		idx, retry, err := n.readIndexOnce(ctx)
		if err == nil {
			if err := n.fsm.WaitApplied(ctx, idx); err != nil {
				return 0, err
			}
			return idx, nil
		}
		if !retry {
			return 0, err
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("%w: cannot confirm a consistent read within %s (last: %v); is a majority of nodes up?", ErrNoLeader, n.cfg.LeaderWait, err)
		case <-time.After(backoff/2 + rand.N(backoff/2+1)):
		}
		backoff = min(backoff*2, maxLeaderBackoff)
	}
}

func (n *Node) readIndexOnce(ctx context.Context) (uint64, bool, error) {
	if n.raft.State() == raft.Leader {
		idx, err := n.leaderReadIndex()
		return idx, err != nil, err
	}
	addr, _ := n.leaderGRPC()
	if addr == "" {
		return 0, true, ErrNoLeader
	}
	client, err := n.peers.node(addr)
	if err != nil {
		return 0, true, err
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	resp, err := client.ReadIndex(cctx, &nodev1.ReadIndexRequest{})
	if err != nil {
		return 0, true, err
	}
	return resp.GetIndex(), false, nil
}

// leaderReadIndex is the Raft read-index step on the leader: take the commit
// index, then confirm leadership with a round of heartbeats.
func (n *Node) leaderReadIndex() (uint64, error) {
	if !n.leaderReady.Load() {
		// A new leader's commit index is only trustworthy once an entry of
		// its own term committed; the leader loop is about to do that.
		return 0, errLeaderNotReady
	}
	idx := n.raft.CommitIndex()
	if err := n.raft.VerifyLeader().Error(); err != nil {
		return 0, err
	}
	return idx, nil
}

// peerPool keeps one gRPC connection per peer address.
type peerPool struct {
	creds credentials.TransportCredentials
	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

func newPeerPool(tlsConf *tls.Config) *peerPool {
	p := &peerPool{conns: map[string]*grpc.ClientConn{}}
	if tlsConf != nil {
		p.creds = credentials.NewTLS(tlsConf)
	} else {
		p.creds = insecure.NewCredentials()
	}
	return p
}

func (p *peerPool) conn(addr string) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.conns[addr]; ok {
		return c, nil
	}
	c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(p.creds))
	if err != nil {
		return nil, fmt.Errorf("connect to peer %s: %w", addr, err)
	}
	p.conns[addr] = c
	return c, nil
}

func (p *peerPool) node(addr string) (nodev1.NodeServiceClient, error) {
	c, err := p.conn(addr)
	if err != nil {
		return nil, err
	}
	return nodev1.NewNodeServiceClient(c), nil
}

// Close closes every connection.
func (p *peerPool) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for a, c := range p.conns {
		c.Close()
		delete(p.conns, a)
	}
}
