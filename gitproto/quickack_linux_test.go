package gitproto

import (
	"net"
	"syscall"
	"testing"
)

// quickAck reaches the socket of a TCP connection as the SSH server
// accepts it (the delay it removes is measured by e2e's BenchmarkGit).
func Test_QuickAck_SetsTheSocketOption(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	rc, err := server.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	get := func() (v int) {
		var gerr error
		if err := rc.Control(func(fd uintptr) { v, gerr = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_QUICKACK) }); err != nil || gerr != nil {
			t.Fatal(err, gerr)
		}
		return v
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_QUICKACK, 0) }); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	if get() != 0 {
		t.Fatal("TCP_QUICKACK did not turn off")
	}
	quickAck(server)()
	if get() != 1 {
		t.Fatal("quickAck did not turn TCP_QUICKACK on")
	}
}
