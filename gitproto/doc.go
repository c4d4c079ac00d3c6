// Package gitproto is gitraft's SSH front end: it authenticates git clients
// by public key, parses the git command they ask for, checks their access,
// and runs the real `git upload-pack`, `git receive-pack` or
// `git upload-archive` against the node's local copy, or proxies the session
// to a node that can take it.
//
// A push's ref change goes through Raft before git updates any ref: git's
// pre-receive hook sees the quarantined objects and hands the push back to
// the session that runs git, over two pipes that session gave receive-pack
// as file descriptors 3 and 4 (git passes them on to its hooks). The hook
// is a few lines of sh that run shell builtins (and cat, past 16 refs;
// hook.go), and no Go binary to start. The backend then replicates the
// pack to a quorum and commits the compare-and-swap. receive-pack starts
// while the backend takes the write lock, its input and output held
// (receivepack.go): a Backend that implements ReadAhead offers the copy,
// and git's ref advertisement reaches the client only if the push's
// transaction says nothing changed the copy meanwhile; otherwise that git
// is killed unseen and a new one starts. The client gets git's exit code
// before the backend's Finish records the version.
//
// The server acknowledges every read at once (TCP_QUICKACK,
// quickack_linux.go): OpenSSH's client keeps Nagle's algorithm on in a
// session without a terminal, and with delayed ACKs each git session
// waited 40 ms, twice.
//
// git's report to the client is read on its way out (reportstatus.go):
// a ref the cluster committed but git then failed to write locally (a
// stale lock, a full disk) is reported "ok", as the state says, and the
// copy is set from the state afterwards.
//
// The front end limits what one client can hold: connections that have not
// authenticated (in all and per source address, with a login grace time,
// like OpenSSH's MaxStartups, PerSourceMaxStartups and LoginGraceTime), and
// sessions per node, per user and per connection. A session ends when it
// is idle, runs too long, or moves less than a floor of bytes in a window
// while the node is not working for it.
//
// A client fetches only what the refs reach (unless the operator allows
// any object by id): upload-pack is configured so for protocol v0 and v1,
// and a protocol v2 session's requests are checked on their way to git,
// which acts on a request only once it has read all of it (wants.go).
//
// gitproto never imports package cluster: it declares the small Backend
// interface it needs, and cmd wires the two together.
package gitproto
