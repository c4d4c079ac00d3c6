package cluster

import (
	"crypto/tls"
	"fmt"
	"net"
	"time"

	"github.com/hashicorp/raft"
)

// streamLayer carries Raft's traffic, over mutual TLS unless the node runs
// insecure on loopback. Only peers holding a node certificate from the
// cluster CA get past the handshake.
type streamLayer struct {
	net.Listener
	advertise net.Addr
	dialTLS   *tls.Config // nil: plaintext
}

func newStreamLayer(ln net.Listener, advertise string, serverTLS, dialTLS *tls.Config) (*streamLayer, error) {
	adv, err := net.ResolveTCPAddr("tcp", advertise)
	if err != nil {
		return nil, fmt.Errorf("raft advertise address %q: %w", advertise, err)
	}
	if adv.IP == nil || adv.IP.IsUnspecified() {
		return nil, fmt.Errorf("raft advertise address %q is not an address peers can dial; set raft_advertise", advertise)
	}
	if serverTLS != nil {
		ln = tls.NewListener(ln, serverTLS)
	}
	return &streamLayer{Listener: ln, advertise: adv, dialTLS: dialTLS}, nil
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
