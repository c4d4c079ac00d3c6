// Package mail holds the forge's mail hosts (MX) and their drain state as
// part of gitraft's replicated state: a deterministic State the cluster's
// state machine embeds, with its rules (the last active host needs --force,
// a host is drained only when its queue is empty). It also holds what runs
// beside a node: the Agent that drives Postfix on a mail host (Postfix, an
// MTA), and the Output that writes the MX set as a zone-file fragment for
// DNS. See DESIGN.md.
package mail
