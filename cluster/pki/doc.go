// Package pki is gitraft's small certificate authority: it creates the
// cluster CA, issues node and admin certificates, and builds the mutual-TLS
// configurations every node-to-node and admin connection uses.
//
// A certificate's role (node or admin) is in its subject's OU; nodes accept
// Raft and node-to-node calls only from node certificates.
package pki
