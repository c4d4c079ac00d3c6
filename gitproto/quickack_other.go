//go:build !linux

package gitproto

import "net"

// quickAck does nothing where TCP_QUICKACK does not exist (see
// quickack_linux.go).
func quickAck(net.Conn) func() { return func() {} }
