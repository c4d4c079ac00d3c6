package cluster

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
)

// streamLayer carries Raft's traffic, over mutual TLS unless the node runs
// insecure on loopback. Only peers holding a node certificate from the
// cluster CA get past the handshake, which runs here (with a deadline)
// rather than inside Raft, so a stray or foreign client is dropped with one
// rate-limited log line instead of an error per connection attempt.
type streamLayer struct {
	ln        net.Listener
	advertise net.Addr
	serverTLS *tls.Config // nil: plaintext
	dialTLS   *tls.Config // nil: plaintext
	log       *slog.Logger

	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once

	mu       sync.Mutex
	lastWarn map[string]time.Time

	// held refuses every inbound Raft connection: a node without Raft state
	// that is still asking to join must take no part in Raft (no votes, no
	// log) until the cluster has admitted it as what it is, a new,
	// empty member. See Node.joinLoop.
	held atomic.Bool
}

func newStreamLayer(ln net.Listener, advertise string, serverTLS, dialTLS *tls.Config, log *slog.Logger) (*streamLayer, error) {
	adv, err := net.ResolveTCPAddr("tcp", advertise)
	if err != nil {
		return nil, fmt.Errorf("raft advertise address %q: %w", advertise, err)
	}
	if adv.IP == nil || adv.IP.IsUnspecified() {
		return nil, fmt.Errorf("raft advertise address %q is not an address peers can dial; set raft_advertise", advertise)
	}
	s := &streamLayer{ln: ln, advertise: adv, serverTLS: serverTLS, dialTLS: dialTLS, log: log,
		conns: make(chan net.Conn), closed: make(chan struct{}), lastWarn: map[string]time.Time{}}
	go s.acceptLoop()
	return s, nil
}

func (s *streamLayer) acceptLoop() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			s.Close()
			return
		}
		if s.serverTLS == nil {
			s.deliver(c)
			continue
		}
		go func() {
			tc := tls.Server(c, s.serverTLS)
			tc.SetDeadline(time.Now().Add(10 * time.Second))
			if err := tc.Handshake(); err != nil {
				s.warn(c.RemoteAddr(), err)
				tc.Close()
				return
			}
			tc.SetDeadline(time.Time{})
			s.deliver(tc)
		}()
	}
}

func (s *streamLayer) deliver(c net.Conn) {
	if s.held.Load() {
		c.Close()
		return
	}
	select {
	case s.conns <- c:
	case <-s.closed:
		c.Close()
	}
}

// warn logs a refused Raft connection, at most once a minute per host.
func (s *streamLayer) warn(addr net.Addr, err error) {
	host, _, _ := net.SplitHostPort(addr.String())
	s.mu.Lock()
	last := s.lastWarn[host]
	now := time.Now()
	if now.Sub(last) < time.Minute {
		s.mu.Unlock()
		return
	}
	s.lastWarn[host] = now
	s.mu.Unlock()
	s.log.Warn("refused a Raft connection (not a node of this cluster, or not TLS); further refusals from this host are not logged for a minute", "remote", addr.String(), "err", err)
}

// Accept implements net.Listener with connections that passed the handshake.
func (s *streamLayer) Accept() (net.Conn, error) {
	select {
	case c := <-s.conns:
		return c, nil
	case <-s.closed:
		return nil, net.ErrClosed
	}
}

func (s *streamLayer) Close() error {
	s.once.Do(func() {
		close(s.closed)
		s.ln.Close()
	})
	return nil
}

func (s *streamLayer) Addr() net.Addr { return s.advertise }

func (s *streamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &net.Dialer{Timeout: timeout}
	if s.dialTLS == nil {
		return d.Dial("tcp", string(address))
	}
	conn, err := tls.DialWithDialer(d, "tcp", string(address), s.dialTLS)
	if err != nil {
		return nil, fmt.Errorf("raft TLS dial %s: %w", address, err)
	}
	return conn, nil
}
