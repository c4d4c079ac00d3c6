// Command gitraft is the one gitraft binary: `gitraft serve` runs a node,
// `gitraft dev` a whole local cluster, and the other subcommands are the
// admin command line (cluster, repo, lock, ca). This package only wires the
// other packages together.
package main
