package gitproto

import (
	"net"
	"syscall"
)

// quickAck returns what makes the kernel acknowledge at once the data c
// has received, instead of delaying the ACK (up to 40 ms on Linux) in the
// hope of sending it along with data.
//
// OpenSSH's client leaves Nagle's algorithm on in a session without a
// terminal (git's), so it holds back a small packet until its previous
// one is acknowledged. When the server has nothing to answer the first
// with (an "env" request, which wants no reply), the client then waited
// for the delayed ACK: 40 ms, twice in every git session on loopback,
// more than everything else a push costs. Linux leaves quick-ACK mode on
// its own, so it is asked again after every read.
func quickAck(c net.Conn) func() {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return func() {}
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return func() {}
	}
	return func() {
		// Best effort: a socket that refuses it (closed meanwhile, not
		// TCP) only ACKs as it otherwise would.
		_ = rc.Control(func(fd uintptr) {
			_ = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_QUICKACK, 1)
		})
	}
}
