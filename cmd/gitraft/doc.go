// Command gitraft is the one gitraft binary: `gitraft serve` runs a node,
// `gitraft dev` a whole local cluster, and the other subcommands are the
// admin command line (cluster, repo, lock, user, key, db, mail, ca); serve
// also starts the PostgreSQL, pgbouncer and Postfix agents its database.* and
// mail.* settings switch on. This package only wires the
// other packages together.
package main
