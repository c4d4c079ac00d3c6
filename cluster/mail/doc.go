// Package mail holds the mail hosts of a forge and their drain state as part
// of gitraft's replicated state (a deterministic State the cluster's state
// machine embeds), and the agent that drives Postfix on a mail host.
package mail
