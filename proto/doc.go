// Package proto holds gitraft's protobuf definitions, buf style
// (gitraft.<service>.v1 in gitraft/<service>/v1/), and the Go code generated
// from them, which is committed. Regenerate with `go generate ./proto`.
//
//   - fsm/v1: Raft log entries, apply results and the snapshot format
//   - node/v1: the node-to-node API (proposal forwarding, read index)
//   - cluster/v1, repo/v1, lock/v1, user/v1: the admin API
//   - db/v1: the PostgreSQL failover target (state, log commands, agent
//     reports, DatabaseService)
//   - mail/v1: mail hosts and drains (state, log commands, MailService)
package proto

//go:generate ./generate.sh
